"""Statistics + groups -> experts -> a saved DIVE MoE checkpoint, streamed layer by layer.

An `ExpertPlan` says, for every expert and layer, which FFN channels it keeps and its
compensation bias; it is computed from statistics alone (pure functions). `write_moe`
then streams the dense checkpoint one decoder layer at a time and writes one safetensors
shard per layer, so the dense and the MoE model are never in memory together.

Legend: E experts, L layers, K kept channels per expert, F dense FFN width, H hidden, D domains.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from dive_ds.io.placement import NodePlacement
from dive_ds.io.shards import ShardWriter, node_file
from dive_ds.models.loading import LayerwiseCheckpoint, check_gated_mlp
from dive_ds.stats import ChannelStats, channel_scores, compensation_bias, kept_channels, mean_var, n_keep

PRESETS = {
    "1of8": dict(num_experts=8, top_k=1, prune_ratio=0.5),
    "2of8": dict(num_experts=8, top_k=2, prune_ratio=0.75),
}
METHODS = ("dive", "random-split", "upcycle", "nomining", "flap")
ROUTER_INITS = ("random", "centroid", "fit")


@dataclass(frozen=True)
class ReconstructConfig:
    """How experts are cut from the dense FFN and how the MoE is assembled."""

    num_experts: int = 8
    """N experts per layer (one per domain group)."""
    top_k: int = 1
    """Experts per token at inference."""
    prune_ratio: float = 0.5
    """r: fraction of FFN channels each expert drops (expert width = round(F * (1 - r)))."""
    score: str = "wifv"
    """Channel importance: wifv (default), ifv or wifn."""
    bias_compensation: bool = True
    """FLAP bias b = W_down[:, removed] @ mean[removed] on each expert's output."""
    router_init: str = "random"
    """random: seeded N(0, router_init_std) (the paper); centroid: from the groups' mean MLP inputs;
    fit: fitted from the dense model afterwards (dive_ds.routerfit; the plan holds the random init)."""
    router_init_std: float = 0.02
    """Standard deviation of the random router init."""
    seed: int = 42
    """Seed for the router init and for the random baselines."""
    method: str = "dive"
    """dive | random-split (LLaMA-MoE) | upcycle (N dense copies) | nomining (random domain groups) | flap (1 expert)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.num_experts < 1:
            raise ValueError(f"--experts must be >= 1 (got {self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--top-k {self.top_k} must be between 1 and --experts {self.num_experts}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(
                f"--prune-ratio must be in [0, 1) (got {self.prune_ratio}); e.g. 0.5 keeps half the FFN"
            )
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"unknown router init {self.router_init!r}; choose one of {ROUTER_INITS}")
        if self.score not in ("wifv", "ifv", "wifn"):
            raise ValueError(f"unknown score {self.score!r}; choose wifv, ifv or wifn")


@dataclass
class ExpertPlan:
    kept_ELK: torch.Tensor
    """[E, L, K] kept channel indices (ascending) of every expert in every layer."""
    mean_ELF: torch.Tensor | None
    """[E, L, F] float64 channel means behind each expert's compensation bias (None: no bias);
    the bias W_down[:, removed] @ mean[removed] is formed while streaming, where W_down is."""
    router_ELH: torch.Tensor
    """[E, L, H] float32 initial router weights."""
    groups: dict[str, list[str]]
    """expert name -> domains whose statistics built it (empty for random baselines)."""


def _group_indices(groups: dict[str, list[str]], domains: list[str]) -> list[list[int]]:
    pos = {d: i for i, d in enumerate(domains)}
    return [[pos[d] for d in members] for members in groups.values()]


def _router_init(
    stats: ChannelStats, idx_per_expert: list[list[int]], cfg: ReconstructConfig
) -> torch.Tensor:
    n_layers, hidden = stats.mlp_in_sum_DLH.shape[1:]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.router_init in ("random", "fit") or not any(idx_per_expert):
        return torch.randn(cfg.num_experts, n_layers, hidden, generator=g) * cfg.router_init_std
    # centroid: logits = x . (mu_e - mu_all) / |mu_e - mu_all|, scaled so that a token at the
    # centroid of its group leads the others by a few units before any training
    counts = stats.count_D.view(-1, 1, 1)
    mu_all = stats.mlp_in_sum_DLH.sum(0) / stats.count_D.sum()
    w = torch.empty(cfg.num_experts, n_layers, hidden, dtype=torch.float64)
    for e, idx in enumerate(idx_per_expert):
        ix = torch.as_tensor(idx)
        mu_e = stats.mlp_in_sum_DLH[ix].sum(0) / counts[ix].sum()
        w[e] = mu_e - mu_all
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = 8.0 / mu_all.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (w * scale).to(torch.float32)


def plan_experts(
    stats: ChannelStats, domains: list[str], groups: dict[str, list[str]] | None, cfg: ReconstructConfig
) -> ExpertPlan:
    """Which channels each expert keeps, per layer, and its bias (pure function of statistics)."""
    n_layers, ffn = stats.sum_DLF.shape[1:]
    keep = n_keep(ffn, cfg.prune_ratio)
    pooled = stats.merged(list(range(len(domains))))
    pooled_mean, _ = mean_var(pooled.count_D, pooled.sum_DLF, pooled.sumsq_DLF)  # [1, L, F]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.method == "flap":
        if cfg.num_experts != 1:
            raise ValueError("method flap builds one dense pruned FFN: use --experts 1 --top-k 1")
        groups = {"flap_all": list(domains)}
    elif cfg.method == "nomining":
        perm = torch.randperm(len(domains), generator=g).tolist()
        groups = {
            f"random_{e}": [domains[i] for i in perm[e :: cfg.num_experts]] for e in range(cfg.num_experts)
        }
    if cfg.method in ("dive", "nomining", "flap"):
        if groups is None or len(groups) != cfg.num_experts:
            raise ValueError(
                f"{cfg.num_experts} experts need {cfg.num_experts} groups "
                f"(got {0 if groups is None else len(groups)}); mine them or pass --groups FILE"
            )
        idx = _group_indices(groups, domains)
        kept, means = [], []
        for members in idx:
            st = stats.merged(members)
            mean, _ = mean_var(st.count_D, st.sum_DLF, st.sumsq_DLF)
            kept.append(kept_channels(channel_scores(st, cfg.score)[0], keep))
            means.append(mean[0])
        kept_ELK = torch.stack(kept)
        mean_ELF = torch.stack(means)
    elif cfg.method == "random-split":
        # LLaMA-MoE: disjoint random channel sets when they fit (N * K <= F), else independent random sets
        idx = [[] for _ in range(cfg.num_experts)]
        kept_ELK = torch.empty(cfg.num_experts, n_layers, keep, dtype=torch.long)
        for layer in range(n_layers):
            perm = torch.randperm(ffn, generator=g)
            for e in range(cfg.num_experts):
                if cfg.num_experts * keep <= ffn:
                    sel = perm[e * keep : (e + 1) * keep]
                else:
                    sel = torch.randperm(ffn, generator=g)[:keep]
                kept_ELK[e, layer] = sel.sort().values
        mean_ELF = pooled_mean.expand(cfg.num_experts, -1, -1)
        groups = {f"random_{e}": [] for e in range(cfg.num_experts)}
    else:  # upcycle: N copies of the whole FFN
        if cfg.prune_ratio != 0.0:
            raise ValueError("method upcycle copies the whole FFN: use --prune-ratio 0")
        idx = [[] for _ in range(cfg.num_experts)]
        kept_ELK = torch.arange(ffn).expand(cfg.num_experts, n_layers, ffn).clone()
        mean_ELF = pooled_mean.expand(cfg.num_experts, -1, -1)
        groups = {f"copy_{e}": [] for e in range(cfg.num_experts)}
    means = mean_ELF if cfg.bias_compensation and keep < ffn else None
    return ExpertPlan(kept_ELK, means, _router_init(stats, idx, cfg), groups)


def moe_config_dict(dense_config, cfg: ReconstructConfig, keep: int) -> dict:
    d = dense_config.to_dict()
    for k in ("architectures", "auto_map", "_name_or_path", "transformers_version", "quantization_config"):
        d.pop(k, None)
    d.update(
        model_type="dive_moe",
        architectures=["DiveMoeForCausalLM"],
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        expert_intermediate_size=keep,
        expert_bias=True,
        router_mode="sparse",
        dense_model_type=dense_config.model_type,
        dive_reconstruction=asdict(cfg),
    )
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
    kept = plan.kept_ELK[experts, layer]  # [k, K]
    out = {
        "gate_up_proj": torch.cat([w_gate_FH[kept], w_up_FH[kept]], dim=1).to(dtype),
        "down_proj": torch.stack([w_down_HF[:, k] for k in kept]).to(dtype),
    }
    if plan.mean_ELF is not None:
        out["bias"] = torch.stack(
            [compensation_bias(w_down_HF, plan.mean_ELF[e, layer], kept[i]) for i, e in enumerate(experts)]
        ).to(dtype)
    else:
        out["bias"] = torch.zeros(len(experts), w_down_HF.shape[0], dtype=dtype)
    return out


def router_tensors(plan: ExpertPlan, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{'gate.weight' [E,H], 'gate.noise_weight' [E,H] (zeros)} of one layer."""
    w = plan.router_ELH[:, layer].to(dtype).contiguous()
    return {"gate.weight": w, "gate.noise_weight": torch.zeros_like(w)}


def experts_json(plan: ExpertPlan, cfg: ReconstructConfig, dense_dir: Path, extra: dict | None) -> str:
    """The text of dive_experts.json: groups, reconstruction settings, expert width, dense model."""
    info = {
        "groups": plan.groups,
        "reconstruction": asdict(cfg),
        "expert_width": plan.kept_ELK.shape[-1],
        "dense_model": str(Path(dense_dir).resolve()),
    }
    return json.dumps(info | (extra or {}), indent=2) + "\n"


def plan_fingerprint(plan: ExpertPlan, moe_config: dict, dtype: torch.dtype) -> str:
    """Short hash of everything that decides the MoE's bits except the dense weights themselves."""
    h = hashlib.sha256()
    h.update(json.dumps([moe_config, plan.groups, str(dtype)], sort_keys=True, default=str).encode())
    for t in (plan.kept_ELK, plan.router_ELH, plan.mean_ELF):
        if t is not None:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _moe_config(dense_dir: Path, plan: ExpertPlan, cfg: ReconstructConfig):
    from transformers import AutoConfig

    from dive_ds.models.moe import DiveMoeConfig

    config = AutoConfig.from_pretrained(dense_dir)
    check_gated_mlp(config)
    d = moe_config_dict(config, cfg, plan.kept_ELK.shape[-1])
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
    everyone = list(range(plan.kept_ELK.shape[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    weight_map: dict[str, str] = {}
    try:
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
        (tmp / "dive_experts.json").write_text(experts_json(plan, cfg, dense_dir, extra_files))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    config, moe_dict, moe_cfg = _moe_config(dense_dir, plan, cfg)
    n_experts = plan.kept_ELK.shape[0]
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
        extra = {"dive_experts.json": experts_json(plan, cfg, dense_dir, extra_info)}
    return writer.finish(extra) | {"reused": False}
