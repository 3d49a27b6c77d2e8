"""`dive-ds mine`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.argtypes import positive_int, ratio
from dive_ds.commands.common import DeviceFlags
from dive_ds.flags import flag, nested

HELP = "domain affinity mining: group the calibration domains into N experts"
DESCRIPTION = (
    "Paper-faithful mining prunes the dense model with each domain's mask and evaluates it on every domain "
    "(D x D perplexities, column-normalised, Pearson, agglomerative clustering). The fast affinity (Jaccard "
    "overlap of kept channels, from statistics alone) is always computed and compared. Writes groups.json, "
    "mining.json, CSV matrices and PNG heatmaps with dendrograms to --out."
)


@dataclass
class Settings:
    calib: str = flag(None, "calibration folder from `dive-ds calibrate`", required=True)
    experts: int = flag(None, "N groups (= experts)", type=positive_int, required=True)
    prune_ratio: float = flag(0.5, "r used for the domain-pruned models (default 0.5)", type=ratio)
    score: str = flag("wifv", "channel score (default wifv)", choices=["wifv", "ifv", "wifn"])
    no_bias_compensation: bool = flag(False, "prune without the FLAP bias")
    fast_only: bool = flag(False, "skip the D x D pruned evaluations; cluster the fast affinity")
    eval_windows: int | None = flag(None, "held-out windows per domain for the pruned evaluations (default all)",
                                    type=positive_int)  # fmt: skip
    linkage: str = flag("average", "agglomerative linkage (default average)",
                        choices=["average", "complete", "single", "weighted"])  # fmt: skip
    model: str | None = flag(None, "dense model (default: the one recorded in the calibration)")
    batch_size: int = flag(8, "windows per forward (default 8)", type=positive_int)
    out: str = flag(None, "output folder", required=True)
    run_on: DeviceFlags = nested(DeviceFlags)


def run(s: Settings) -> int:
    from dive_ds.build.mine import mine

    mine(s.calib, s.out, s.experts, s.prune_ratio, s.score, not s.no_bias_compensation, s.fast_only,
         s.eval_windows, s.model, s.batch_size, s.linkage, s.run_on.device, s.run_on.dtype)  # fmt: skip
    return 0
