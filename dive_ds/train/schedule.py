"""The learning-rate schedule of a stage (a LambdaLR factor)."""

from __future__ import annotations

import math

from dive_ds.train.config import StageConfig


def lr_factor(stage: StageConfig, steps: int):
    """LambdaLR factor after `s` optimizer steps: linear warm-up to 1, then constant or cosine to min_lr_ratio."""
    warmup = math.ceil(stage.warmup_ratio * steps) if stage.warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if stage.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
