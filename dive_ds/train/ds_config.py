"""The DeepSpeed JSON of a run: cross-checked against the run config, batch fields filled in,
the expert-parallel size, and a stage's variant."""

from __future__ import annotations

import copy

from dive_ds.io.placement import check_ep_size, largest_ep_size
from dive_ds.train.config import RunConfig, StageConfig


def _find_auto(obj, where: str = "") -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = _find_auto(v, f"{where}.{k}" if where else k)
            if hit:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _find_auto(v, f"{where}[{i}]")
            if hit:
                return hit
    elif obj == "auto":
        return where
    return None


SECTIONS = ("fp16", "bf16", "zero_optimization", "optimizer", "scheduler", "expert_parallel",
            "activation_checkpointing", "tensorboard", "wandb", "csv_monitor", "flops_profiler", "comms_logger")  # fmt: skip
"""DeepSpeed JSON sections that must be mappings (`"fp16": true` would fail deep inside with AttributeError)."""


def resolve_ds_config(
    ds: dict, run: RunConfig, world_size: int, accelerator: str, source: str = "DeepSpeed config"
) -> dict:
    """Cross-check a DeepSpeed JSON against the run config and fill the batch fields.

    micro batch x grad accumulation x world size must equal train.global_batch_size. A JSON that
    omits gradient_accumulation_steps (and train_batch_size) gets it derived from the run config.
    Raises a one-line ValueError on: "auto" values, a batch mismatch, precision disagreement,
    fp16, bf16 on a CPU accelerator, a ZeRO stage the run does not allow, a non-torch Adam (JIT
    build), a `scheduler` block (the stages own the schedule).
    """
    ds = copy.deepcopy(ds)
    for section in SECTIONS:
        if section in ds and not isinstance(ds[section], dict):
            raise ValueError(
                f"{source}: {section} is {ds[section]!r}, not a mapping; write it as "
                f'"{section}": {{...}} (e.g. "fp16": {{"enabled": false}})'
            )
    auto = _find_auto(ds)
    if auto:
        raise ValueError(f"{source}: '{auto}' is \"auto\", which only the HF Trainer fills; put a number")
    glob = run.train.global_batch_size
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    tbs = ds.get("train_batch_size")
    if mbs is None:
        if tbs is not None and gas is not None:
            mbs = tbs // (gas * world_size)
        else:
            raise ValueError(f"{source}: set train_micro_batch_size_per_gpu (sequences per rank per forward)")
    if not isinstance(mbs, int) or mbs < 1:
        raise ValueError(f"{source}: train_micro_batch_size_per_gpu={mbs!r}; use an integer >= 1")
    if gas is None:
        if glob % (mbs * world_size):
            raise ValueError(
                f"{source}: train.global_batch_size {glob} is not a multiple of "
                f"train_micro_batch_size_per_gpu {mbs} x world size {world_size}; change one of them"
            )
        gas = glob // (mbs * world_size)
    if mbs * gas * world_size != glob:
        raise ValueError(
            f"{source}: train_micro_batch_size_per_gpu ({mbs}) x gradient_accumulation_steps ({gas}) x "
            f"world size ({world_size}) = {mbs * gas * world_size} but the run config's "
            f"train.global_batch_size is {glob}; set gradient_accumulation_steps to "
            f"{glob // (mbs * world_size) if glob % (mbs * world_size) == 0 else '?'} or omit it"
        )
    if tbs is not None and tbs != glob:
        raise ValueError(
            f"{source}: train_batch_size={tbs} but the run config's train.global_batch_size is {glob}; "
            "make them equal or omit train_batch_size"
        )
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"] = (
        mbs,
        gas,
        glob,
    )

    if ds.get("fp16", {}).get("enabled", False):
        raise ValueError(
            f"{source}: fp16 is enabled; DIVE retraining supports fp32 or bf16: "
            "set fp16.enabled false (and bf16.enabled true on GPU)"
        )
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    want = run.train.precision == "bf16"
    if bf16 != want:
        raise ValueError(
            f"{source}: bf16.enabled is {str(bf16).lower()} but the run config's train.precision is "
            f"{run.train.precision}; make them agree"
        )
    if bf16 and accelerator == "cpu" and not run.train.allow_cpu_bf16:
        raise ValueError(
            f"{source}: bf16 is enabled but the accelerator is cpu; use fp32 on CPU "
            "(bf16.enabled false, train.precision fp32) or set train.allow_cpu_bf16 true"
        )
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in run.train.zero_stages:
        raise ValueError(
            f"{source}: ZeRO stage {stage} is not allowed by train.zero_stages "
            f"{list(run.train.zero_stages)}; use one of those"
        )
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or opt.get("type", "").lower() not in ("adam", "adamw"):
        raise ValueError(
            f'{source}: set an optimizer block {{"type": "AdamW", "params": {{"torch_adam": true}}}}'
        )
    params = opt.setdefault("params", {})
    if not params.get("torch_adam", False):
        raise ValueError(
            f"{source}: optimizer.params.torch_adam must be true (torch's AdamW; avoids the "
            "FusedAdam / DeepSpeedCPUAdam JIT builds)"
        )
    if "scheduler" in ds:
        raise ValueError(
            f"{source}: remove the `scheduler` block; each stage's lr schedule comes from the "
            "run config (stages.<name>.lr / schedule / warmup_ratio)"
        )
    # The expert_parallel section is read by dive_ds (resolve_ep_size), which builds DIVE's own AutoEP-family
    # layers; DeepSpeed's AutoEP transform would replace them with plain Mixtral-style layers.
    ds.pop("expert_parallel", None)
    return ds


def resolve_ep_size(ds: dict, run: RunConfig, source: str = "DeepSpeed config") -> int | None:
    """The expert-parallel size: parallel.ep_size, else the JSON's expert_parallel.autoep_size, else None."""
    if run.parallel.ep_size is not None:
        return run.parallel.ep_size
    section = ds.get("expert_parallel")
    if not section or not section.get("enabled", False):
        return None
    size = section.get("autoep_size")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{source}: expert_parallel.autoep_size={size!r}; use an integer >= 1")
    unsupported = sorted(set(section) - {"enabled", "autoep_size"})
    if unsupported:
        raise ValueError(
            f"{source}: expert_parallel.{unsupported[0]} is an option of DeepSpeed's own AutoEP transform, "
            "which dive_ds does not use (DIVE builds its own AutoEP-family layers); keep only enabled and "
            "autoep_size"
        )
    return size


def launch_ep_size(
    ds: dict, run: RunConfig, world: int, num_experts: int, source: str = "DeepSpeed config"
) -> dict:
    """The expert-parallel size of this launch -> {"size", "configured", "from", "note"}.

    An explicit `parallel.ep_size` (run config or --set) is used as given, and refused in one line when it
    does not divide the world size or the experts. The DeepSpeed JSON's `expert_parallel.autoep_size` is a
    ceiling that follows the launch: the largest size <= it that divides both (1 = no expert parallelism).
    `note` is the line to print when that differs from the JSON's value; size None means no EP section.
    """
    configured = resolve_ep_size(ds, run, source)
    if configured is None:
        return {"size": None, "configured": None, "from": None, "note": None}
    if run.parallel.ep_size is not None:
        check_ep_size(configured, world, num_experts)
        return {"size": configured, "configured": configured, "from": "parallel.ep_size", "note": None}
    where = f"{source} expert_parallel.autoep_size"
    size = largest_ep_size(configured, world, num_experts)
    note = None
    if size != configured:
        note = (
            f"expert parallel {size} instead of {where}={configured}: the largest size <= {configured} that "
            f"divides {world} rank(s) and {num_experts} experts"
            f"{' (1: every rank holds every expert)' if size == 1 else ''}; --set parallel.ep_size=N fixes it"
        )
    return {"size": size, "configured": configured, "from": where, "note": note}


def stage_ds_config(ds: dict, stage: StageConfig) -> dict:
    """The resolved DeepSpeed config of one stage: the stage's lr goes into the optimizer."""
    ds = copy.deepcopy(ds)
    ds["optimizer"]["params"]["lr"] = stage.lr
    return ds
