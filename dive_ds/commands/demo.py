"""`dive-ds demo`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.argtypes import int_at_least, nonneg_int, positive_int, ratio
from dive_ds.flags import flag

HELP = "the whole pipeline on the embedded default (SmolLM2 + demo pack)"
DESCRIPTION = (
    "calibrate -> mine -> reconstruct (DIVE, token clusters and baselines) -> fit the routers -> evaluate -> "
    "retrain, on SmolLM2-135M-Instruct and the built-in demo pack, with small sample counts."
)


@dataclass
class Settings:
    out: str = flag("runs/demo", "run folder (default runs/demo)")
    experts: int = flag(6, "N experts (default 6)", type=positive_int)
    top_k: int = flag(1, "k (default 1)", type=positive_int)
    prune_ratio: float = flag(0.5, "r (default 0.5)", type=ratio)
    samples_per_domain: int = flag(16, "calibration windows per domain (default 16)", type=positive_int)
    seq_len: int = flag(256, "tokens per window (default 256)", type=int_at_least(2))
    eval_windows: int = flag(4, "held-out windows per domain (default 4)", type=positive_int)
    mining_eval_windows: int = flag(2, "held-out windows per domain for the D x D pruned evaluations (default 2)",
                                    type=positive_int)  # fmt: skip
    only: list[str] | None = flag(None, "use only these demo domains", nargs="+", metavar="DOMAIN")
    groups_from: str = flag("clusters", "the fitted and retrained MoE's experts: cut from each layer's token "
                            "clusters (default; docs/beyond.md) or from DIVE's mined domain groups",
                            choices=("clusters", "domains"))  # fmt: skip
    retrain_steps: list[int] = flag([0, 12], "steps of the router and experts stages of the fitted MoE (default 0 "
                                    "12: the fitted router needs no router stage; 0 0 skips retraining)",
                                    type=nonneg_int, nargs=2, metavar=("ROUTER", "EXPERTS"))  # fmt: skip
    retrain_batch: int = flag(4, "sequences of 256 tokens per step (default 4)", type=positive_int)
    dtype: str = flag("auto", "compute precision: auto (default: calibration and router fitting fp32, mining and "
                      "evaluation bf16 where the GPU or CPU multiplies bf16 natively, else fp32), fp32 or bf16 "
                      "(all of them); retraining stays fp32", choices=("auto", "fp32", "bf16"))  # fmt: skip


def run(s: Settings) -> int:
    from dive_ds.build.demo import run_demo

    run_demo(s)
    return 0
