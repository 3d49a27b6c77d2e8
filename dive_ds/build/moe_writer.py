"""Statistics + groups -> experts -> a saved DIVE MoE checkpoint, streamed layer by layer.

An `ExpertPlan` (dive_ds.build.expert_plan) says,
for every expert and layer, which FFN channels it keeps and its compensation bias; it is computed from
statistics alone (pure functions). `write_moe`
then streams the dense checkpoint one decoder layer at a time and writes one safetensors
shard per layer, so the dense and the MoE model are never in memory together.

Legend: E experts, L layers, K kept channels per expert, F dense FFN width, H hidden, D domains.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from dive_ds.build.expert_plan import ExpertPlan, ReconstructConfig
from dive_ds.io.atomic import staged_dir
from dive_ds.io.loading import LayerwiseCheckpoint, check_gated_mlp
from dive_ds.io.placement import NodePlacement
from dive_ds.io.shards import ShardWriter, node_file
from dive_ds.stats import compensation_bias


def moe_config_dict(dense_config, cfg: ReconstructConfig, keep: int | list[int], shared: int = 0) -> dict:
    """The DiveMoeConfig fields of the MoE; `keep`: the expert width, or every layer's (plan.widths_L), which
    becomes expert_intermediate_sizes unless the layers' widths are all equal."""
    widths = [keep] if isinstance(keep, int) else list(keep)
    per_layer = widths if len(set(widths)) > 1 else None
    d = dense_config.to_dict()
    for k in ("architectures", "auto_map", "_name_or_path", "transformers_version", "quantization_config"):
        d.pop(k, None)
    d.update(
        model_type="dive_moe",
        architectures=["DiveMoeForCausalLM"],
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        expert_intermediate_size=max(widths),
        expert_bias=True,
        router_mode="sparse",
        dense_model_type=dense_config.model_type,
        dive_reconstruction=asdict(cfg),
    )
    if per_layer is not None:
        d["expert_intermediate_sizes"] = per_layer
    if shared:
        d["shared_expert_intermediate_size"] = shared
    return d


SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
"""Files of the dense folder copied next to the MoE weights."""


def pop_dense_mlp(st: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take the gated MLP out of one layer's state -> (w_gate_FH, w_up_FH, w_down_HF)."""
    return st.pop("mlp.gate_proj.weight"), st.pop("mlp.up_proj.weight"), st.pop("mlp.down_proj.weight")


def expert_tensors(
    w_gate_FH: torch.Tensor,
    w_up_FH: torch.Tensor,
    w_down_HF: torch.Tensor,
    plan: ExpertPlan,
    layer: int,
    experts: list[int],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Experts `experts` of one layer cut from its dense MLP, stacked in that order.

    -> {'gate_up_proj' [k,2K,H], 'down_proj' [k,H,K], 'bias' [k,H]}. Each expert's values do not
    depend on which others are asked for, so a node computing only its own experts writes the
    same bits as `write_moe`.
    """
    kept = plan.kept_L[layer][experts]  # [k, K]
    out = {
        "gate_up_proj": torch.cat([w_gate_FH[kept], w_up_FH[kept]], dim=1).to(dtype),
        "down_proj": torch.stack([w_down_HF[:, k] for k in kept]).to(dtype),
    }
    # what the expert and the shared expert (if any) do not keep is what its bias compensates
    covered = kept if plan.shared_L is None else [torch.cat([plan.shared_L[layer], k]) for k in kept]
    if plan.mean_ELF is not None:
        out["bias"] = torch.stack(
            [compensation_bias(w_down_HF, plan.mean_ELF[e, layer], covered[i]) for i, e in enumerate(experts)]
        ).to(dtype)
    else:
        out["bias"] = torch.zeros(len(experts), w_down_HF.shape[0], dtype=dtype)
    if plan.output_scale != 1.0:  # LLaMA-MoE's expert-output scale, folded into the weights
        out["down_proj"] = out["down_proj"] * plan.output_scale
        out["bias"] = out["bias"] * plan.output_scale
    return out


def shared_expert_tensors(
    w_gate_FH: torch.Tensor,
    w_up_FH: torch.Tensor,
    w_down_HF: torch.Tensor,
    plan: ExpertPlan,
    layer: int,
    dtype,
) -> dict[str, torch.Tensor]:
    """{'gate_up_proj' [1,2S,H], 'down_proj' [1,H,S]} of the layer's shared expert ({} without one)."""
    if plan.shared_L is None:
        return {}
    s = plan.shared_L[layer]
    return {
        "gate_up_proj": torch.cat([w_gate_FH[s], w_up_FH[s]]).unsqueeze(0).to(dtype),
        "down_proj": (w_down_HF[:, s] * plan.output_scale).unsqueeze(0).to(dtype),
    }


def router_tensors(plan: ExpertPlan, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{'gate.weight' [E,H], 'gate.noise_weight' [E,H] (zeros)} of one layer."""
    w = plan.router_ELH[:, layer].to(dtype).contiguous()
    return {"gate.weight": w, "gate.noise_weight": torch.zeros_like(w)}


def experts_json(
    plan: ExpertPlan, cfg: ReconstructConfig, dense_dir: Path, extra: dict | None, moe_config=None
) -> str:
    """The text of dive_experts.json: groups, reconstruction settings, expert width (a list of every layer's
    for per-layer widths), dense model and, given the MoE's config, its parameter counts: total, activated
    (top-k) and trainable in the experts stage with its default LoRA (r = 8, routers, RMSNorms)."""
    widths = plan.widths_L
    info = {
        "groups": plan.groups,
        "reconstruction": asdict(cfg),
        "expert_width": widths[0] if len(set(widths)) == 1 else widths,
        "dense_model": str(Path(dense_dir).resolve()),
    }
    if moe_config is not None:
        from dive_ds.models.lora import experts_stage_trainable
        from dive_ds.models.moe import count_parameters

        info["parameters"] = count_parameters(moe_config) | {
            "trainable": experts_stage_trainable(moe_config)["trainable"],
            "trainable_in": "experts stage: LoRA r=8 on every expert, routers (and noise), RMSNorms",
        }
    return json.dumps(info | (extra or {}), indent=2) + "\n"


def plan_fingerprint(plan: ExpertPlan, moe_config: dict, dtype: torch.dtype) -> str:
    """Short hash of everything that decides the MoE's bits except the dense weights themselves."""
    h = hashlib.sha256()
    h.update(json.dumps([moe_config, plan.groups, str(dtype)], sort_keys=True, default=str).encode())
    # one width: the [E, L, K] tensor, as it was hashed before per-layer widths existed
    kept = [plan.kept_ELK] if len(set(plan.widths_L)) == 1 else plan.kept_L
    for t in (*kept, plan.router_ELH, plan.mean_ELF, *(plan.shared_L or [])):
        if t is not None:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _moe_config(dense_dir: Path, plan: ExpertPlan, cfg: ReconstructConfig):
    from transformers import AutoConfig

    from dive_ds.models.moe import DiveMoeConfig

    config = AutoConfig.from_pretrained(dense_dir)
    check_gated_mlp(config)
    d = moe_config_dict(config, cfg, plan.widths_L, 0 if plan.shared_L is None else len(plan.shared_L[0]))
    return config, d, DiveMoeConfig(**d)


@torch.no_grad()
def write_moe(
    dense_dir: str | Path,
    plan: ExpertPlan,
    cfg: ReconstructConfig,
    out: str | Path,
    extra_files: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Stream the dense checkpoint layer by layer into a DIVE MoE checkpoint at `out` (atomic).

    `extra_files`: extra entries of dive_experts.json (e.g. the calibration folder)."""
    dense_dir, out = Path(dense_dir), Path(out)
    config, _, moe_cfg = _moe_config(dense_dir, plan, cfg)
    ckpt = LayerwiseCheckpoint(dense_dir)
    everyone = list(range(plan.kept_L[0].shape[0]))
    weight_map: dict[str, str] = {}
    with staged_dir(out) as tmp:
        shared = {k: ckpt.get(k).to(dtype) for k in ckpt.keys() if not k.startswith("model.layers.")}
        name = "model-shared.safetensors"
        save_file({k: v.contiguous() for k, v in shared.items()}, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shared, name))
        del shared
        for layer in range(config.num_hidden_layers):
            st = ckpt.layer_state(layer)
            w_gate, w_up, w_down = pop_dense_mlp(st)
            tensors = {f"model.layers.{layer}.{k}": v.to(dtype) for k, v in st.items()}
            p = f"model.layers.{layer}.mlp."
            ex = expert_tensors(w_gate, w_up, w_down, plan, layer, everyone, dtype)
            tensors.update({p + "experts." + k: v for k, v in ex.items()})
            sh = shared_expert_tensors(w_gate, w_up, w_down, plan, layer, dtype)
            tensors.update({p + "shared_expert." + k: v for k, v in sh.items()})
            tensors.update({p + k: v for k, v in router_tensors(plan, layer, dtype).items()})
            name = f"model-layer-{layer:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors, st, w_gate, w_up, w_down, ex
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
        moe_cfg.save_pretrained(tmp)
        for fname in SIDE_FILES:
            if (dense_dir / fname).exists():
                shutil.copy2(dense_dir / fname, tmp / fname)
        (tmp / "dive_experts.json").write_text(experts_json(plan, cfg, dense_dir, extra_files, moe_cfg))
    return out


@torch.no_grad()
def write_moe_shards(
    dense_dir: str | Path,
    plan: ExpertPlan,
    cfg: ReconstructConfig,
    out: str | Path,
    placement: NodePlacement,
    extra_info: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """This node's part of a sharded MoE folder (dive_ds.io.shards), streamed layer by layer.

    Node 0 writes the shared tensors, config and side files; every node writes the experts it is
    the writer of, with the same bits as `write_moe`. A node holds one dense layer (only its MLP
    on nodes other than 0) plus its own experts of that layer. A rerun of a node whose part is
    complete does nothing. -> the node's record (files, seconds, tensor_bytes, reused).
    `extra_info`: extra entries of dive_experts.json, as `extra_files` of write_moe.
    """
    dense_dir, out = Path(dense_dir), Path(out)
    if len(set(plan.widths_L)) > 1:
        raise ValueError(
            f"method {cfg.method} gives per-layer expert widths, which the sharded format does not support: "
            "reconstruct without --shards"
        )
    config, moe_dict, moe_cfg = _moe_config(dense_dir, plan, cfg)
    n_experts = plan.kept_L[0].shape[0]
    writer = ShardWriter(
        out,
        moe_cfg,
        n_experts,
        placement.ep_size,
        placement.nodes,
        placement.gpus_per_node,
        placement.node,
        fingerprint=plan_fingerprint(plan, moe_dict, dtype),
    )
    if writer.already_done():
        return json.loads((out / node_file(placement.node)).read_text()) | {"reused": True}
    node0, mine = placement.node == 0, writer.experts
    ckpt = LayerwiseCheckpoint(dense_dir)
    if node0:
        writer.write_shared(
            {k: ckpt.get(k).to(dtype) for k in ckpt.keys() if not k.startswith("model.layers.")}
        )
    for layer in range(config.num_hidden_layers if node0 or mine else 0):
        if node0:
            st = ckpt.layer_state(layer)
        else:  # the experts need only the MLP
            head = f"model.layers.{layer}.mlp."
            names = [head + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]
            st = {k[len(f"model.layers.{layer}.") :]: v for k, v in ckpt.get_many(names).items()}
        w_gate, w_up, w_down = pop_dense_mlp(st)
        if node0:
            p = f"model.layers.{layer}."
            shared = {p + k: v.to(dtype) for k, v in st.items()}
            shared.update({p + "mlp." + k: v for k, v in router_tensors(plan, layer, dtype).items()})
            sh = shared_expert_tensors(w_gate, w_up, w_down, plan, layer, dtype)
            shared.update(
                {p + "mlp.shared_expert." + k: v for k, v in sh.items()}
            )  # replicated, like attention
            writer.write_shared_layer(layer, shared)
            del shared
        for e in mine:  # one at a time: the same bits as write_moe's stacked tensors (see expert_tensors)
            ex = expert_tensors(w_gate, w_up, w_down, plan, layer, [e], dtype)
            writer.write_expert(layer, e, {k: v[0] for k, v in ex.items()})
            del ex
        del st, w_gate, w_up, w_down
    extra = None
    if node0:
        for fname in SIDE_FILES:
            if (dense_dir / fname).exists():
                writer.copy_file(dense_dir / fname)
        extra = {"dive_experts.json": experts_json(plan, cfg, dense_dir, extra_info, moe_cfg)}
    return writer.finish(extra) | {"reused": False}
