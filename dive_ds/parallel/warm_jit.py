"""Build DeepSpeed's JIT ops once (shm_comm on CPU) so later runs start fast.

`deepspeed.init_distributed()` compiles the `shm_comm` extension on first use (about 40 s,
cached in $TORCH_EXTENSIONS_DIR). Running it here, inside `make` set-up, keeps that cost out
of every test and every demo run.
"""

import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        os.environ.setdefault(key, value)
    t0 = time.time()
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    dist.destroy_process_group()
    print(
        f"deepspeed JIT ops ready ({time.time() - t0:.1f}s, cache {os.environ.get('TORCH_EXTENSIONS_DIR')})"
    )


if __name__ == "__main__":
    main()
