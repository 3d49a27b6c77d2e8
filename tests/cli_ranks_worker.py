"""Run by tests/test_ranks_eval.py under `torchrun --nproc-per-node 2`: several `dive-ds` commands in one
launch (torch and transformers are imported once per rank, not once per command).

argv[1]: a JSON file of argument lists; each is run through `dive_ds.cli.main` on every rank, inside one
gloo process group joined here (the commands use it as they find it). Each rank writes its exit statuses
to argv[2]/codes{rank}.json and prints `=== job i` to stderr before job i.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dive_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    codes = []
    for i, argv in enumerate(json.loads(Path(sys.argv[1]).read_text())):
        print(f"=== job {i}", file=sys.stderr, flush=True)
        codes.append(main(argv))
        dist.barrier()
    Path(sys.argv[2], f"codes{dist.get_rank()}.json").write_text(json.dumps(codes))
    dist.destroy_process_group()
