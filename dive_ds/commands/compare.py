"""`dive-ds compare`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.argtypes import int_at_least, nonneg_int, positive_float, positive_int, ratio
from dive_ds.commands.common import names, seeds
from dive_ds.flags import flag

HELP = "DIVE vs no mining vs LLaMA-MoE split vs FLAP (uniform and adaptive), at an equal training budget"
DESCRIPTION = (
    "From one calibration: builds every method at the same activated FFN width, gives every MoE a fitted "
    "router and/or a random one (+ router stage), retrains each for the same steps through the same "
    "DeepSpeed trainer (once per --data-seeds), and scores all on the same windows of the evaluation set "
    "(seen domains, and --eval-domains never calibrated or trained on), with paired bootstrap intervals of "
    "every ratio. Writes compare.json, compare.md and ppl_vs_tokens.png; rerun the same command to resume."
)


@dataclass
class Settings:
    calib: str = flag(None, "calibration folder", required=True)
    groups: str = flag(None, "groups.json from `dive-ds mine` (DIVE's groups)", required=True)
    out: str = flag(None, "output folder (a rerun of the same comparison resumes)", required=True)
    eval_domains: str | None = flag(
        None, "registry of domains never calibrated or trained on (e.g. demo-unseen)"
    )
    experts: int = flag(6, "N experts (default 6)", type=positive_int)
    top_k: int = flag(1, "k (default 1)", type=positive_int)
    prune_ratio: float = flag(0.5, "r (default 0.5)", type=ratio)
    steps: int = flag(64, "training steps per method (default 64)", type=positive_int)
    router_steps: int = flag(16, "router-stage steps of the random-router treatment, out of --steps (default 16)",
                             type=nonneg_int)  # fmt: skip
    batch: int = flag(4, "sequences per step (default 4)", type=positive_int)
    seq_len: int = flag(256, "tokens per sequence (default 256)", type=int_at_least(2))
    lr: float = flag(1e-4, "learning rate of every stage (default 1e-4)", type=positive_float)
    eval_every: int = flag(16, "steps between curve points (default 16)", type=positive_int)
    eval_windows: int = flag(16, "windows per seen domain, spread over its evaluation set (default 16)",
                             type=positive_int)  # fmt: skip
    unseen_windows: int = flag(16, "windows per --eval-domains domain (default 16)", type=positive_int)
    curve_windows: int = flag(4, "windows per domain of the training curve (default 4)", type=positive_int)
    fit_windows: int | None = flag(None, "calibration windows per domain for router fitting (default all)",
                                   type=positive_int)  # fmt: skip
    methods: str = flag("dive,nomining,llama-moe,flap,flap-adaptive", "comma-separated: dive, nomining, llama-moe, "
                        "random-halves, flap, flap-adaptive, flap-eqtrain, dive-shared<s> (DIVE with a shared expert of s x F, "
                        "e.g. dive-shared0.25), dive-clusters (experts from token clusters: calibrate "
                        "--token-clusters N)")  # fmt: skip
    treatments: str = flag("fitted,random", "router treatments of the MoEs (default both)")
    grouping_seeds: str = flag("42", "seeds of the seeded baselines (default 42)")
    data_seeds: str = flag("1234", "training-data seeds, one run each (default 1234)")
    bootstrap: int = flag(2000, "paired bootstrap resamples (default 2000)", type=positive_int)
    lambada_items: int = flag(0, "LAMBADA-style items scored per model (default 0: all; the unseen pack's narrative "
                              "evaluation set)", type=nonneg_int)  # fmt: skip
    no_lambada: bool = flag(False, "skip the LAMBADA-style task")
    reuse_models: str | None = flag(None, "an earlier compare's --out: hard-link its models where they are exactly "
                                    "what this run builds", metavar="DIR")  # fmt: skip
    quick: bool = flag(False, "a few steps and windows (for tests)")


def run(s: Settings, argv: list[str]) -> int:
    from dive_ds.build.compare import run_compare
    from dive_ds.build.compare_plan import CompareConfig, quick
    from dive_ds.build.router_config import RouterFitConfig

    cfg = CompareConfig(
        experts=s.experts, top_k=s.top_k, prune_ratio=s.prune_ratio, steps=s.steps, router_steps=s.router_steps,
        batch=s.batch, seq_len=s.seq_len, lr=s.lr, eval_every=s.eval_every, eval_windows=s.eval_windows,
        unseen_windows=s.unseen_windows, curve_windows=s.curve_windows,
        fit=RouterFitConfig(windows_per_domain=s.fit_windows), methods=names(s.methods),
        treatments=names(s.treatments), grouping_seeds=seeds(s.grouping_seeds, "--grouping-seeds"),
        data_seeds=seeds(s.data_seeds, "--data-seeds"), bootstrap=s.bootstrap,
        lambada=None if s.no_lambada else s.lambada_items,
    )  # fmt: skip
    run_compare(s.calib, s.groups, s.out, quick(cfg) if s.quick else cfg, s.eval_domains, s.reuse_models,
                command=argv)  # fmt: skip
    return 0
