"""DIVE retraining (router -> experts -> continue) with DeepSpeed. Works under every launcher:

deepspeed --num_gpus 2 launchers/retrain.py --deepspeed ds_configs/zero3.json --config RUN.yaml
torchrun --nproc_per_node 2 launchers/retrain.py --deepspeed ds_configs/zero2.json --config RUN.yaml
python launchers/retrain.py --deepspeed ds_configs/zero2.json --config RUN.yaml --set stages.experts.lr=5e-5
python launchers/retrain.py --consolidate OUT/stages/experts/checkpoints --out MERGED_HF_DIR
"""

import sys

from dive_ds.argtypes import OneLineParser, nonneg_int


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="retrain", description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", metavar="CONFIG.json", help="DeepSpeed JSON, e.g. ds_configs/zero2.json")
    p.add_argument("--config", metavar="RUN.yaml", help="run config, e.g. configs/demo_retrain.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config field, e.g. --set stages.experts.lr=5e-5 (repeatable)")  # fmt: skip
    p.add_argument("--stages", help="comma-separated subset of the enabled stages to run now (default: all)")
    p.add_argument(
        "--local_rank", "--local-rank", type=nonneg_int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument(
        "--consolidate", metavar="CKPT_DIR", help="DeepSpeed checkpoint -> merged HF model at --out"
    )
    p.add_argument("--out", help="output folder of --consolidate")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --consolidate: replace an --out folder that holds anything but this same consolidation; "
        "else: start afresh in an out_dir that holds another run (its files are moved aside, never deleted)",
    )
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.consolidate:
            from dive_ds.train.export import consolidate_checkpoint

            if not a.out:
                raise ValueError("--consolidate needs --out DIR")
            print(f"consolidated -> {consolidate_checkpoint(a.consolidate, a.out, force=a.force)}")
            return 0
        if not a.deepspeed or not a.config:
            raise ValueError("pass --deepspeed CONFIG.json and --config RUN.yaml")
        from dive_ds.train.retrain import retrain
        from dive_ds.train.stop import Interrupted

        stages = [s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None
        try:
            retrain(a.config, a.deepspeed, a.overrides, stages, a.local_rank, sys.argv, a.force)
        except Interrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved; relaunch to resume
            print(f"retrain: {e}", file=sys.stderr)
            return 143
        return 0
    except (ValueError, OSError) as e:
        from dive_ds.steps import error_message

        msg = error_message(e)
        print(f"retrain: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
