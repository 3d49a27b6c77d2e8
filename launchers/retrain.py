"""DIVE retraining (router -> experts -> continue) with DeepSpeed. Works under every launcher:

deepspeed --num_gpus 2 launchers/retrain.py --deepspeed ds_configs/zero3.json --config RUN.yaml
torchrun --nproc_per_node 2 launchers/retrain.py --deepspeed ds_configs/zero2.json --config RUN.yaml
python launchers/retrain.py --deepspeed ds_configs/zero2.json --config RUN.yaml --set stages.experts.lr=5e-5
python launchers/retrain.py --consolidate OUT/stages/experts/checkpoints --out MERGED_HF_DIR

The same as `dive-ds retrain ...` (dive_ds/commands/retrain.py); this file is the design card's entry.
"""

import sys

from dive_ds.argtypes import OneLineParser, error_message
from dive_ds.commands import retrain as command
from dive_ds.flags import add_flags, from_namespace


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="retrain", description=__doc__.splitlines()[0])
    add_flags(p, command.Settings)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return command.run(from_namespace(command.Settings, a), sys.argv)
    except command.ONE_LINE_ERRORS as e:
        print(f"retrain: error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
