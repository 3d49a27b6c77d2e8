"""A stage's input model: check the folder, load it with real weights (ZeRO-3: each rank its
partition), and check the loaded parameters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dive_ds.io.loading import check_complete, load_causal_lm
from dive_ds.models.moe import DiveMoeForCausalLM


def check_moe_folder(path: str | Path, what: str = "model.path") -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{what}: {path} is not a Hugging Face model folder (no config.json); "
            "point it at a MoE checkpoint from `dive-ds reconstruct`"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "dive_moe":
        raise ValueError(
            f"{what}: {path} is a {model_type!r} model, not dive_moe; run `dive-ds reconstruct` "
            "first and retrain its output"
        )
    from dive_ds.io.shards import is_sharded

    if not is_sharded(path):  # a sharded folder is checked by its reader (ShardedMoe)
        check_complete(path)  # every weight there: none would be initialised at random
    return path


def load_model(path: Path, ds_config: dict, zero3_init: bool):
    """from_pretrained with real weights -> (model, keep-alive). For ZeRO-3 with zero3_init the
    returned HfDeepSpeedConfig must stay alive until the engine exists (it makes transformers load
    each rank's partition inside zero.Init)."""
    from transformers import AutoModelForCausalLM

    from dive_ds.io.shards import is_sharded

    if is_sharded(path):
        raise ValueError(
            f"{path} is a sharded MoE (reconstruct --shards): retrain it with expert parallelism "
            "(parallel.ep_size > 1 or expert_parallel.autoep_size), or make one HF folder first with "
            "`dive-ds consolidate --shards`"
        )
    check_complete(path)
    keep = None
    if zero3_init and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = load_causal_lm(path, AutoModelForCausalLM, precheck=False, dtype=torch.float32)
    if not isinstance(model, DiveMoeForCausalLM):
        raise ValueError(f"{path} loaded as {type(model).__name__}, not DiveMoeForCausalLM")
    return model, keep


@torch.no_grad()
def check_parameter_stats(model: nn.Module, bound: float) -> dict:
    """Every parameter finite and |w| < bound, checked on each rank's partition, reduced over ranks.

    Catches weights from uninitialised memory (a bare zero.Init) that a falling loss would hide.
    """
    names, stats = [], []
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", p.data)  # ZeRO-3: this rank's partition
        local = local.float()
        nonfinite = (~torch.isfinite(local)).sum().item() if local.numel() else 0
        finite = local[torch.isfinite(local)] if nonfinite else local
        absmax = finite.abs().max().item() if finite.numel() else 0.0
        names.append(name)
        stats.append([float(nonfinite), absmax])
    t = torch.tensor(stats, dtype=torch.float64)
    if dist.is_initialized():
        sums, maxs = t[:, 0].clone(), t[:, 1].clone()
        dist.all_reduce(sums)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
        t = torch.stack([sums, maxs], dim=1)
    bad = [(n, s) for n, s in zip(names, t.tolist()) if s[0] > 0]
    if bad:
        raise ValueError(
            f"parameter {bad[0][0]} has {int(bad[0][1][0])} non-finite values after loading; "
            "the checkpoint is corrupt or was not loaded"
        )
    worst = int(t[:, 1].argmax())
    if t[worst, 1] >= bound:
        raise ValueError(
            f"parameter {names[worst]} has |w| = {t[worst, 1]:.3g} >= {bound:g} after loading "
            "(uninitialised memory?); check the checkpoint or raise model.max_abs_weight"
        )
    return {
        "parameters": len(names),
        "max_abs": float(t[:, 1].max()),
        "max_abs_name": names[worst],
        "zero3_partitioned": sum(1 for p in model.parameters() if hasattr(p, "ds_id")),
    }
