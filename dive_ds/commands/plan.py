"""`dive-ds plan`: its flags are PlanConfig's and PassPlanConfig's (dive_ds/plan.py)."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.flags import flag, nested
from dive_ds.plan import PassPlanConfig, PlanConfig

HELP = "parameters and per-GPU memory of a DIVE MoE on a cluster (arithmetic only)"
DESCRIPTION = (
    "Total / activated / trainable parameters and bytes per GPU for weights, gradients, optimiser states and "
    "activations under expert parallelism and ZeRO-2/3; says whether it fits --gpu-mem; the streaming passes' "
    "FLOPs and time, and the peak memory per rank of every phase. An estimate for choosing settings (see "
    "dive_ds/plan.py and dive_ds/plan_memory.py)."
)


@dataclass
class Settings:
    model: str = flag(None, "config.json, model folder, or a preset: llama2-70b, llama3-70b, tinyllama-1.1b, "
                      "smollm2-135m", required=True)  # fmt: skip
    cluster: PlanConfig = nested(PlanConfig)
    passes: PassPlanConfig = nested(
        PassPlanConfig, "streaming passes (calibration, router fit, evaluation) over all GPUs"
    )


def run(s: Settings) -> int:
    from dive_ds.plan import format_passes, format_plan, load_model_config, plan, plan_passes
    from dive_ds.plan_memory import dense_bytes, format_phase_memory, phase_memory

    model_cfg = load_model_config(s.model)
    print(format_plan(s.model, s.cluster, plan(model_cfg, s.cluster)))
    print(format_passes(s.cluster, s.passes, plan_passes(model_cfg, s.cluster, s.passes)))
    print(format_phase_memory(phase_memory(model_cfg, s.cluster, s.passes), dense_bytes(model_cfg, s.passes)))
    return 0
