"""What a stage trains: routing mode, LoRA, requires_grad per parameter kind, the optimizer's
parameter groups, and the stages DeepSpeed cannot run with expert parallelism."""

from __future__ import annotations

import torch
from torch import nn

from dive_ds.models.lora import add_expert_lora
from dive_ds.models.moe import DiveMoeForCausalLM, moe_blocks, set_router_mode
from dive_ds.train.config import STAGE_ORDER, StageConfig, stage_temperature


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def param_kind(name: str) -> str:
    if ".lora_" in name:
        return "lora"
    if ".mlp.gate.noise_weight" in name:
        return "router_noise"
    if ".mlp.gate." in name:
        return "router"
    if name.endswith(".mlp.experts.bias"):
        return "expert_bias"
    if ".mlp.experts." in name:
        return "experts"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norm"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "other"


def trainable_kinds(stage: StageConfig, noise_on: bool) -> set[str]:
    kinds = set()
    if stage.lora:
        kinds.add("lora")
    if stage.train_router:
        kinds.add("router")
        if stage.router_mode == "sparse" and noise_on:
            kinds.add("router_noise")  # dense routing never uses the noise weights (they would get no grad)
    if stage.train_norms:
        kinds.add("norm")
    if stage.train_expert_bias:
        kinds.add("expert_bias")
    if stage.unfreeze_attention:
        kinds.add("attention")
    if stage.unfreeze_embeddings:
        kinds.add("embeddings")
    return kinds


def prepare_stage_model(model: DiveMoeForCausalLM, stage: StageConfig, seed: int) -> dict:
    """Routing mode, LoRA and requires_grad for a stage (in place) -> trainable counts per kind."""
    top_k = model.config.num_experts_per_tok
    if stage.router_mode == "dense":
        set_router_mode(model, "dense", stage_temperature(stage, top_k))
    else:
        set_router_mode(model, "sparse")
    noise_on = stage.router_noise and model.config.router_noise and model.config.router_noise_scale > 0
    if stage.router_gate is not None:
        model.config.router_gate = stage.router_gate
    for block in moe_blocks(model):
        block.gate.noise = bool(noise_on)
        block.gate.gate_kind = model.config.router_gate
    if stage.lora:
        add_expert_lora(
            model,
            r=stage.lora_r,
            alpha=stage.lora_alpha,
            dropout=stage.lora_dropout,
            seed=seed + STAGE_ORDER.index(stage.name),
        )
    kinds = trainable_kinds(stage, bool(noise_on))
    counts: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        kind = param_kind(name)
        p.requires_grad_(kind in kinds)
        total += _numel(p)
        if kind in kinds:
            counts[kind] = counts.get(kind, 0) + _numel(p)
    if not counts:
        raise ValueError(f"stage {stage.name}: nothing to train (check lora / train_router / train_norms)")
    return {"total": total, "trainable": sum(counts.values()), "by_kind": counts}


def trainable_line(stage: str, counts: dict) -> str:
    frac = 100.0 * counts["trainable"] / counts["total"]
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts["by_kind"].items()))
    return f"[{stage}] trainable parameters: {counts['trainable']:,} of {counts['total']:,} ({frac:.3f}%): {parts}"


def param_groups(model: nn.Module, ep_size: int | None, zero_stage: int) -> list:
    """Trainable parameters for the optimizer; with expert parallelism, DeepSpeed's MoE param groups.

    ZeRO-1/2 with MoE layers insists on at least one MoE param group, which the router stage (experts
    frozen) does not have: it gets an empty one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not ep_size:
        return params
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dive"})


ZERO2_EP_FROZEN = (
    "DeepSpeed 0.19.8's ZeRO-1/2 optimizer asserts 'The model has moe layers, but None of the param "
    "groups are marked as MoE' when no expert parameter trains"
)


def check_ep_stage(stage: StageConfig, zero_stage: int, ep_size: int | None) -> None:
    """Refuse, before any work, a stage that DeepSpeed cannot run with expert parallelism."""
    if not ep_size or zero_stage not in (1, 2):
        return
    if not (stage.lora or stage.train_expert_bias):
        raise ValueError(
            f"stage {stage.name} with ZeRO-{zero_stage} and expert parallelism {ep_size}: the experts are "
            f"frozen and {ZERO2_EP_FROZEN}; run this stage with ds_configs/zero3.json (ZeRO-3 + EP) or "
            "without expert parallelism (--set parallel.ep_size=1)"
        )
