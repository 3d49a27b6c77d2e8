"""`dive-ds plan`: parameter counts and per-GPU memory for a DIVE MoE on a cluster (pure arithmetic).

Memory model (bytes per GPU), bf16 weights and gradients, fp32 Adam (master + 2 moments):
- expert parameters are split over the expert-parallel group (each rank holds E/P experts);
  everything else is replicated before ZeRO;
- ZeRO-2 partitions gradients and optimiser states over the data-parallel ranks (experts
  over the expert-data-parallel group of W/P ranks); ZeRO-3 also partitions the weights;
- activations: every layer's input is kept (activation checkpointing) plus one layer's
  working set, b*s*h*(34 + 5*a*s/h) bytes (the usual estimate for a transformer layer in
  16-bit), with the MoE FFN part scaled by top-k x expert width / dense width.
It is an estimate for choosing settings, not a measurement; leave headroom (default 10%).

The streaming passes (`plan_passes`), per token of a window of S tokens, L layers, hidden H, FFN width F,
attention projections A = 2*H*heads*head_dim + 2*H*kv*head_dim, N experts of width F' and top-k:
- calibration (dense forward through the decoder layers; no head, the pass needs no logits):
    FLOPs = 2 * L * (A + 3*H*F) + 4 * L * S * H
  the second term is attention itself (Q K^T and the weighted sum of V, 2*S*H multiply-adds each,
  counted over the whole window: an upper bound for causal attention);
- router fit (the sliced shortcut of dive-ds fit-router, experts fresh from reconstruction): the dense
  gate/up projections, one down projection over each expert's removed channels for its error, then
  the routed MoE layer to carry the hidden states on:
    FLOPs = 2 * L * (A + 2*H*F + N*H*(F - F') + 3*k*H*F') + 4 * L * S * H
- evaluation of the MoE (held-out perplexity, with the router and the head):
    FLOPs = 2 * (L * (A + N*H + 3*k*H*F') + V*H) + 4 * L * S * H.
Tokens = domains x windows per domain x S; the windows are split evenly over all ranks
(ceil(windows / world) per rank). Per rank the calibration carries windows per rank x S x H hidden
states in the pass dtype (4 bytes fp32, 2 bf16), reads every layer's weights once (per-layer bytes =
(A + 3*H*F + 2*H) x dtype bytes), and accumulates float64 statistics of 8 x (D + 2*D*L*F + D*L*H +
2*L*F) bytes (ChannelStats: count, sum, sum of squares, MLP-input sum, two down_proj column norms).
Wall time = FLOPs / (world x --tflops), --tflops the sustained dense-matmul rate of one GPU (default
400, a bf16 H100-class GPU at roughly 40% of its 989 TFLOP/s peak; use about 40 for fp32); reading
weights and the all-reduce of the statistics are not counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dive_ds.argtypes import int_at_least, nonneg_int, positive_float, positive_int, ratio
from dive_ds.flags import flag

PRESETS = {
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}  # fmt: skip
GB = 1e9


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for."""

    experts: int = flag(8, "N (default 8)", type=positive_int)
    """N experts per layer."""
    top_k: int = flag(1, "k (default 1)", type=positive_int)
    """Experts per token."""
    prune_ratio: float = flag(0.5, "r (default 0.5)", type=ratio)
    """r: each expert keeps round(F * (1 - r)) channels."""
    shared_ratio: float = flag(0.0, "s: a shared expert of round(F s) channels (reconstruct --shared-ratio; the "
                               "routed experts keep round(F (1 - r)) - round(F s)); default 0", type=ratio)  # fmt: skip
    """s: an always-on shared expert of round(F * s) channels, replicated like attention (0: none)."""
    nodes: int = flag(1, "nodes (default 1)", type=positive_int)
    gpus_per_node: int = flag(8, "GPUs per node (default 8)", type=positive_int)
    ep: int = flag(8, "expert-parallel size (default 8)", type=positive_int)
    """Expert-parallel size P (divides N and the world size)."""
    zero: int = flag(3, "ZeRO stage, 2 or 3 (default 3)", type=nonneg_int)
    stage: str = flag("experts", "trainables (default experts)", choices=["router", "experts"])
    """Trainables: router (routers only) or experts (LoRA + routers + norms)."""
    lora_rank: int = 8
    micro_batch: int = flag(1, "sequences per GPU per micro step (default 1)", type=positive_int)
    seq_len: int = flag(1024, "tokens per sequence (default 1024)", type=int_at_least(2))
    gpu_mem_gb: float = flag(80.0, "GPU memory in GB (default 80)", type=positive_float, name="--gpu-mem")
    headroom: float = 0.10

    def __post_init__(self):
        world = self.nodes * self.gpus_per_node
        if self.zero not in (2, 3):
            raise ValueError(f"--zero must be 2 or 3 (got {self.zero})")
        if self.experts % self.ep or world % self.ep:
            raise ValueError(
                f"--ep {self.ep} must divide --experts {self.experts} and the world size {world}"
            )
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"--top-k {self.top_k} must be between 1 and --experts {self.experts}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"--prune-ratio must be in [0, 1) (got {self.prune_ratio})")
        if self.shared_ratio and not (self.top_k == 1 and self.shared_ratio < 1 - self.prune_ratio):
            raise ValueError(f"--shared-ratio {self.shared_ratio} needs --top-k 1 and s < 1 - r")
        if self.stage not in ("router", "experts"):
            raise ValueError(f"--stage must be router or experts (got {self.stage})")


def load_model_config(model: str) -> dict:
    if model in PRESETS:
        return dict(PRESETS[model])
    p = Path(model)
    p = p / "config.json" if p.is_dir() else p
    if not p.exists():
        raise ValueError(
            f"--model {model!r} is neither a config.json / model folder nor a preset ({', '.join(PRESETS)})"
        )
    return json.loads(p.read_text())


def attention_params(model_cfg: dict) -> int:
    """A = 2*H*heads*head_dim + 2*H*kv*head_dim: one layer's q/o and k/v projections."""
    h, heads = model_cfg["hidden_size"], model_cfg["num_attention_heads"]
    kv = model_cfg.get("num_key_value_heads", heads)
    head_dim = model_cfg.get("head_dim") or h // heads
    return 2 * h * heads * head_dim + 2 * h * kv * head_dim


def plan(model_cfg: dict, cfg: PlanConfig) -> dict:
    h, f, n_layers = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["num_hidden_layers"]
    heads = model_cfg["num_attention_heads"]
    vocab, tied = model_cfg["vocab_size"], model_cfg.get("tie_word_embeddings", False)
    shared_w = round(f * cfg.shared_ratio) if cfg.shared_ratio else 0  # reconstruct's n_keep(F, 1 - s)
    width = max(1, round(f * (1 - cfg.prune_ratio))) - shared_w
    e = cfg.experts
    attn = attention_params(model_cfg)
    norms = 2 * h
    router = 2 * e * h  # weight + noise_weight
    expert = 3 * width * h + h  # gate, up, down + bias
    shared = vocab * h * (1 if tied else 2) + h
    non_expert = shared + n_layers * (
        attn + norms + router + 3 * shared_w * h
    )  # the shared expert: replicated
    experts_total = n_layers * e * expert
    total = non_expert + experts_total
    activated = non_expert + n_layers * cfg.top_k * expert
    lora_per_expert = cfg.lora_rank * (h + 2 * width) + cfg.lora_rank * (width + h)
    lora_shared = cfg.lora_rank * (2 * h + 3 * shared_w) if shared_w else 0
    if cfg.stage == "router":
        train_non_expert, train_expert = n_layers * e * h, 0
    else:
        train_non_expert = n_layers * (router + norms + lora_shared) + h
        train_expert = n_layers * e * lora_per_expert
    trainable = train_non_expert + train_expert

    world = cfg.nodes * cfg.gpus_per_node
    edp = world // cfg.ep  # ranks sharing the same experts
    w_non = non_expert / (world if cfg.zero == 3 else 1)
    w_exp = experts_total / cfg.ep / (edp if cfg.zero == 3 else 1)
    # ZeRO-3 gathers one layer at a time for compute: add one full layer (non-expert + local experts)
    gathered = (attn + norms + router + 3 * shared_w * h + e // cfg.ep * expert) if cfg.zero == 3 else 0
    weights = 2 * (w_non + w_exp + gathered)
    lora_local = train_expert / cfg.ep  # LoRA tensors live with their experts
    grads = 2 * (train_non_expert / world + lora_local / edp)
    optim = 12 * (train_non_expert / world + lora_local / edp)
    b, s = cfg.micro_batch, cfg.seq_len
    moe_scale = (cfg.top_k * width + shared_w) / f
    layer_act = b * s * h * (34 + 5 * heads * s / h)
    layer_act *= 0.5 + 0.5 * moe_scale  # roughly half of the 34 h terms are the FFN's
    activations = n_layers * b * s * h * 2 + layer_act + b * s * vocab * 4  # + fp32 logits
    per_gpu = weights + grads + optim + activations
    budget = cfg.gpu_mem_gb * GB * (1 - cfg.headroom)
    return {
        "params": {"total": total, "activated": activated, "trainable": trainable,
                   "trainable_fraction": trainable / total, "expert_width": width},
        "per_gpu_bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations,
                          "total": per_gpu},
        "world": world, "expert_data_parallel": edp, "fits": per_gpu <= budget, "budget_bytes": budget,
    }  # fmt: skip


def format_plan(name: str, cfg: PlanConfig, p: dict) -> str:
    pr, m = p["params"], p["per_gpu_bytes"]
    return (
        f"{name}: N={cfg.experts} k={cfg.top_k} r={cfg.prune_ratio} (expert width {pr['expert_width']}), "
        f"{cfg.nodes}x{cfg.gpus_per_node} GPUs, EP={cfg.ep}, ZeRO-{cfg.zero}, stage {cfg.stage}\n"
        f"  params: total {pr['total'] / 1e9:.2f}B, activated {pr['activated'] / 1e9:.2f}B, "
        f"trainable {pr['trainable'] / 1e6:.1f}M ({100 * pr['trainable_fraction']:.3f}%)\n"
        f"  per GPU: weights {m['weights'] / GB:.1f} GB + grads {m['gradients'] / GB:.2f} GB + optimizer "
        f"{m['optimizer'] / GB:.2f} GB + activations {m['activations'] / GB:.1f} GB (mb {cfg.micro_batch} x "
        f"{cfg.seq_len}) = {m['total'] / GB:.1f} GB -> "
        f"{'fits' if p['fits'] else 'DOES NOT fit'} {cfg.gpu_mem_gb:g} GB with {cfg.headroom:.0%} headroom"
    )


# --------------------------------------------------------------------------- the streaming passes

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class PassPlanConfig:
    """The streaming passes (calibration, router fit, evaluation) over all GPUs of the cluster."""

    domains: int = flag(7, "calibration domains (default 7)", type=positive_int)
    """D calibration domains."""
    windows_per_domain: int = flag(
        1024,
        "calibration windows per domain (default 1024)",
        type=positive_int,
        name=("--samples-per-domain", "--windows-per-domain"),
    )
    """Calibration windows per domain."""
    seq_len: int = flag(1024, "tokens per window (default 1024)", type=positive_int, name="--calib-seq-len")
    """S tokens per window."""
    fit_windows_per_domain: int | None = flag(None, "windows per domain for the router fit (default: all calibration "
                                              "windows)", type=positive_int, name="--fit-windows")  # fmt: skip
    """Windows per domain the router fit uses (None: all calibration windows)."""
    eval_windows_per_domain: int = flag(16, "held-out windows per domain (default 16)", type=positive_int,
                                        name="--eval-windows")  # fmt: skip
    """Held-out windows per domain the evaluation reads."""
    dtype: str = flag("bf16", "weights and carried hidden states of the passes (default bf16)",
                      choices=["fp32", "bf16"])  # fmt: skip
    """Weights and carried hidden states of the passes: fp32 or bf16."""
    tflops: float = flag(400.0, "sustained TFLOP/s per GPU (default 400: bf16 on an H100-class GPU at ~40%% of "
                         "peak; ~40 for fp32)", type=positive_float)  # fmt: skip
    """Sustained TFLOP/s of one GPU."""

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be fp32 or bf16 (got {self.dtype})")
        if self.tflops <= 0:
            raise ValueError(f"--tflops must be > 0 (got {self.tflops})")

    @property
    def fit_windows(self) -> int:
        return self.windows_per_domain if self.fit_windows_per_domain is None else self.fit_windows_per_domain


def plan_passes(model_cfg: dict, cfg: PlanConfig, p: PassPlanConfig) -> dict:
    """FLOPs, bytes and wall time of calibration, router fit and evaluation (formulas: module docstring)."""
    h, f, n_layers = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["num_hidden_layers"]
    vocab = model_cfg["vocab_size"]
    width = max(1, round(f * (1 - cfg.prune_ratio)))
    e, k, s = cfg.experts, cfg.top_k, p.seq_len
    attn = attention_params(model_cfg)
    attn_core = 4 * n_layers * s * h  # per token
    world = cfg.nodes * cfg.gpus_per_node
    rate = world * p.tflops * 1e12
    nbytes = DTYPE_BYTES[p.dtype]

    def one_pass(windows_per_domain: int, params_per_token: int) -> dict:
        windows = p.domains * windows_per_domain
        tokens = windows * s
        flops = tokens * (2 * params_per_token + attn_core)
        return {"windows": windows, "tokens": tokens, "windows_per_rank": math.ceil(windows / world),
                "flops": flops, "seconds": flops / rate}  # fmt: skip

    calib = one_pass(p.windows_per_domain, n_layers * (attn + 3 * h * f))
    calib["hidden_bytes_per_rank"] = calib["windows_per_rank"] * s * h * nbytes
    calib["layer_weight_bytes"] = (attn + 3 * h * f + 2 * h) * nbytes
    calib["weight_bytes_read_per_rank"] = n_layers * calib["layer_weight_bytes"] + vocab * h * nbytes
    calib["stats_bytes"] = 8 * (
        p.domains + 2 * p.domains * n_layers * f + p.domains * n_layers * h + 2 * n_layers * f
    )
    fit = one_pass(p.fit_windows, n_layers * (attn + 2 * h * f + e * h * (f - width) + 3 * k * h * width))
    fit["hidden_bytes_per_rank"] = fit["windows_per_rank"] * s * h * nbytes
    # each rank carries its own tokens' hidden state, residual and MLP input (fp32) and expert errors; across
    # ranks only sums and two scalars per token travel (dive_ds/build/router_pass.py)
    fit["rows_bytes_per_rank"] = fit["windows_per_rank"] * s * 4 * (3 * h + e) + 2 * 8 * fit["tokens"]
    evaluation = one_pass(
        p.eval_windows_per_domain, n_layers * (attn + e * h + 3 * k * h * width) + vocab * h
    )
    return {"world": world, "calibrate": calib, "fit_router": fit, "evaluate": evaluation}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_passes(cfg: PlanConfig, p: PassPlanConfig, r: dict) -> str:
    c, fit, ev = r["calibrate"], r["fit_router"], r["evaluate"]
    gpus = f"{r['world']} GPUs ({cfg.nodes}x{cfg.gpus_per_node}) at {p.tflops:g} TFLOP/s each"
    return (
        f"streaming passes, {p.dtype}, {gpus}:\n"
        f"  calibration: {p.domains} domains x {p.windows_per_domain} windows x {p.seq_len} = "
        f"{c['tokens']:,} tokens, {c['flops']:.3e} FLOPs -> {_duration(c['seconds'])}\n"
        f"    per rank: {c['windows_per_rank']} windows, hidden states {c['hidden_bytes_per_rank'] / GB:.2f} GB, "
        f"weights read {c['layer_weight_bytes'] / GB:.2f} GB per layer ({c['weight_bytes_read_per_rank'] / GB:.1f} GB "
        f"in all); statistics {c['stats_bytes'] / GB:.3f} GB (float64)\n"
        f"  router fit: {p.fit_windows} windows per domain = {fit['tokens']:,} tokens, {fit['flops']:.3e} FLOPs -> "
        f"{_duration(fit['seconds'])}; hidden states {fit['hidden_bytes_per_rank'] / GB:.2f} GB per rank "
        f"(carried fp32 rows {fit['rows_bytes_per_rank'] / GB:.2f} GB per rank, none gathered)\n"
        f"  evaluation: {p.eval_windows_per_domain} windows per domain = {ev['tokens']:,} tokens, "
        f"{ev['flops']:.3e} FLOPs -> {_duration(ev['seconds'])}"
    )
