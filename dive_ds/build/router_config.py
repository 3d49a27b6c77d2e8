"""How routers are fitted (`dive-ds fit-router`'s settings; build/router_pass.py runs the fit). Light: the
CLI derives the flags from this dataclass without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.argtypes import nonneg_float, positive_float, positive_int
from dive_ds.flags import flag

TARGETS = ("auto", "hard", "soft")


@dataclass(frozen=True)
class RouterFitConfig:
    """How routers are fitted."""

    target: str = flag("auto", "hard: arg-min error label; soft: softmax(-error/tau); auto (default): hard for top-1",
                       choices=list(TARGETS))  # fmt: skip
    """hard (arg-min label), soft (softmax of -error / tau) or auto (hard for top-1, soft otherwise)."""
    l2: float = flag(1e-4, "L2 penalty on the standardised weights (default 1e-4)", type=nonneg_float)
    """L2 penalty on the (standardised) router weights, added to the mean cross-entropy."""
    max_iter: int = flag(200, "L-BFGS iterations per layer, at most (default 200)", type=positive_int)
    """L-BFGS iterations per layer (at most)."""
    tolerance: float = flag(1e-3, "L-BFGS stops once every gradient entry is below this (default 1e-3)",
                            type=positive_float)  # fmt: skip
    """L-BFGS stops once every gradient entry of the mean loss is below this (the fit's data are nearly
    separable, so the last iterations only grow the weights; benchmarks/router_fit_cost.py measures it)."""
    windows_per_domain: int | None = flag(None, "calibration windows per domain to use (default all)",
                                          name=("--fit-windows", "--windows-per-domain"),
                                          type=positive_int)  # fmt: skip
    """Calibration windows per domain used for the fit (None: all of them)."""
    holdout_every: int = 8
    """Every n-th calibration window, counted over all domains in order, is left out of the fit and reports
    label accuracy (the same as every n-th of each domain when each has a multiple of n; counted per domain,
    a fit on fewer than n windows per domain held nothing out and reported nan)."""
    noise_ratio: float = flag(
        0.5, "initial noisy top-k std / median top-1 margin (default 0.5)", type=nonneg_float
    )
    """Initial noise std of noisy top-k as a fraction of the median top-1 - top-2 logit margin."""
    batch_size: int = 8
    """Windows per forward."""
    sliced_shortcut: bool = True
    """When the experts are exact slices of the dense FFN (fresh from reconstruction), their errors come
    from the dense intermediate alone (one down-projection per expert); else every expert runs."""
    progress: bool = flag(True, "no progress bar", name="--no-progress", action="store_false")

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"--target {self.target!r}: choose one of {TARGETS}")
        if self.l2 < 0:
            raise ValueError(f"--l2 {self.l2}: use a penalty >= 0")
        if not self.tolerance > 0:
            raise ValueError(f"--tolerance {self.tolerance}: use a gradient tolerance > 0")
        if self.max_iter < 1:
            raise ValueError(f"--max-iter {self.max_iter}: use at least 1 L-BFGS iteration")
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every={self.holdout_every}: use >= 2 (every n-th window held out)")
        if not 0 <= self.noise_ratio:
            raise ValueError(f"noise_ratio={self.noise_ratio}: use a ratio >= 0")
