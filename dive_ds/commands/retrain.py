"""`dive-ds retrain` (and launchers/retrain.py, the design card's entry): DIVE retraining (router -> experts ->
continue) with DeepSpeed, or --consolidate of a DeepSpeed checkpoint into a merged Hugging Face folder (a
sharded reconstruction is joined by `dive-ds consolidate`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dive_ds.argtypes import nonneg_int
from dive_ds.flags import flag

HELP = "retrain a DIVE MoE with DeepSpeed (router, experts, continue stages), or consolidate its checkpoint"
DESCRIPTION = "DIVE retraining (router -> experts -> continue) with DeepSpeed. Works under every launcher."
INTERRUPTED = 143  # a signal or the stop file: a checkpoint was saved; relaunch the same command to resume
ONE_LINE_ERRORS = (ValueError, OSError)
"""Errors printed as one line (bad input). A RuntimeError in training (CUDA out of memory, NCCL) keeps its
traceback, in `dive-ds retrain` as in launchers/retrain.py."""


@dataclass
class Settings:
    deepspeed: str | None = flag(None, "DeepSpeed JSON, e.g. ds_configs/zero2.json", metavar="CONFIG.json")
    config: str | None = flag(None, "run config, e.g. configs/demo_retrain.yaml", metavar="RUN.yaml")
    overrides: list[str] = flag([], "override one run-config field, e.g. --set stages.experts.lr=5e-5 (repeatable)",
                                name="--set", action="append", metavar="KEY=VALUE")  # fmt: skip
    stages: str | None = flag(None, "comma-separated subset of the enabled stages to run now (default: all)")
    local_rank: int | None = flag(None, "set by the deepspeed launcher", name=("--local_rank", "--local-rank"),
                                  type=nonneg_int)  # fmt: skip
    consolidate: str | None = flag(
        None, "DeepSpeed checkpoint -> merged HF model at --out", metavar="CKPT_DIR"
    )
    out: str | None = flag(None, "output folder of --consolidate")
    force: bool = flag(False, "with --consolidate: replace an --out folder that holds anything but this same "
                       "consolidation; else: start afresh in an out_dir that holds another run (its files are "
                       "moved aside, never deleted)")  # fmt: skip


def run(s: Settings, argv: list[str] | None = None) -> int:
    """0 when done, INTERRUPTED (143) when stopped with a checkpoint saved; ValueError/OSError for bad input."""
    if s.consolidate:
        from dive_ds.train.export import consolidate_checkpoint

        if not s.out:
            raise ValueError("--consolidate needs --out DIR")
        print(f"consolidated -> {consolidate_checkpoint(s.consolidate, s.out, force=s.force)}")
        return 0
    if not s.deepspeed or not s.config:
        raise ValueError("pass --deepspeed CONFIG.json and --config RUN.yaml")
    from dive_ds.train.retrain import retrain
    from dive_ds.train.stop import Interrupted

    stages = [x.strip() for x in s.stages.split(",") if x.strip()] if s.stages else None
    try:
        retrain(s.config, s.deepspeed, s.overrides, stages, s.local_rank, argv or sys.argv, s.force)
    except Interrupted as e:  # SIGTERM/SIGINT: a checkpoint was saved; relaunch to resume
        print(f"retrain: {e}", file=sys.stderr)
        return INTERRUPTED
    return 0
