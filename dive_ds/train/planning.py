"""Which stages a launch runs, where each one writes, and what each one starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dive_ds.train.config import STAGE_ORDER, RunConfig, StageConfig, stage_steps

DONE_FILE = "retrain_stage.json"
"""Written into a stage's model folder last: the stage is done."""


@dataclass
class StagePlan:
    stage: StageConfig
    index: int
    steps: int
    step_offset: int
    """Global TensorBoard step of this stage's step 0 (sum of earlier enabled stages' steps)."""
    dir: Path

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def done(self) -> bool:
        return (self.model_dir / DONE_FILE).is_file()


def plan_stages(run: RunConfig, only: list[str] | None = None) -> list[StagePlan]:
    if only:
        unknown = [s for s in only if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(
                f"--stages {','.join(only)}: unknown stage {unknown[0]!r}; use {', '.join(STAGE_ORDER)}"
            )
        disabled = [s for s in only if not run.stage(s).enabled]
        if disabled:
            raise ValueError(
                f"--stages: stage {disabled[0]!r} is disabled in the run config; set "
                f"stages.{disabled[0]}.enabled=true"
            )
    plans, offset = [], 0
    for stage in run.enabled_stages():
        steps = stage_steps(stage, run.train, run.data)
        if not only or stage.name in only:
            plans.append(
                StagePlan(
                    stage,
                    STAGE_ORDER.index(stage.name),
                    steps,
                    offset,
                    Path(run.out_dir) / "stages" / stage.name,
                )
            )
        offset += steps
    if not plans:
        raise ValueError("no stage to run: enable at least one of stages.router / experts / continue")
    return plans


def stage_inputs(run: RunConfig) -> dict[str, Path | None]:
    """Each enabled stage's input folder: init_from, else the previous enabled stage's output, else model.path."""
    previous = Path(run.model.path) if run.model.path else None
    inputs: dict[str, Path | None] = {}
    for stage in run.enabled_stages():
        inputs[stage.name] = Path(stage.init_from) if stage.init_from else previous
        previous = Path(run.out_dir) / "stages" / stage.name / "model"
    return inputs
