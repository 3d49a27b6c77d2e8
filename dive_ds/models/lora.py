"""LoRA for the fused 3-D experts of a DIVE MoE (stage 2 of DIVE retraining).

Every expert e gets its own low-rank pair on the fused gate/up projection and on the down
projection; the adapters run inside the grouped dispatch, over the same expert-sorted rows
as the frozen weights:

    gate_up(x) = W_gu[e] x + s * B_gu[e] A_gu[e] drop(x)        s = alpha / r
    down(h)    = W_d[e]  h + s * B_d[e]  A_d[e]  drop(h)

B starts at zero, so an adapted model starts out equal to the plain one. `merge_expert_lora`
folds s * B @ A into `gate_up_proj` / `down_proj` and puts the original `DiveExperts`
back, so a merged model is again a plain `DiveMoeForCausalLM` (same parameter names).

Shape suffixes (as in moe.py): E experts, H hidden, F expert FFN width, R LoRA rank,
N routed rows (sorted by expert), T tokens, K experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dive_ds.models.moe import (
    DENSE_ATTENTION,
    EXPERT_IMPLS,
    DiveExperts,
    DiveMoeConfig,
    aligned_16,
    grouped_mm_checked,
    grouped_mm_supported,
    moe_blocks,
    permute,
    unpermute,
)

LORA_PARAM_NAMES = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")
LORA_MERGES = (
    ("gate_up_proj", "lora_gate_up_B", "lora_gate_up_A"),
    ("down_proj", "lora_down_B", "lora_down_A"),
)
"""(weight, its B, its A) of each adapted projection."""


def _shape(p: torch.Tensor) -> torch.Size:
    # A ZeRO-3 partitioned parameter keeps its full shape in ds_shape (its .shape is empty).
    return getattr(p, "ds_shape", p.shape)


def _segment_matmul(
    x_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, offs_E: torch.Tensor | None
) -> torch.Tensor:
    """Row segment e of x times w[e].T -> [N, O]; one grouped matmul when offs_E is given, else a loop."""
    if offs_E is not None:
        return grouped_mm_checked(x_NI, w_EOI.transpose(-2, -1), offs_E)
    segments = torch.split(x_NI, counts_E.tolist())
    return torch.cat([F.linear(seg, w_EOI[e]) for e, seg in enumerate(segments)], dim=0)


def lora_expert_mlp(
    x_NH: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_EFH2: torch.Tensor,
    down_EHF: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    act,
    dropout,
    bias_EH: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """`grouped_expert_mlp` plus per-expert LoRA on both projections -> y_NH.

    lora = (A_gu [E,R,H], B_gu [E,2F,R], A_d [E,R,F], B_d [E,H,R]); `dropout` is applied to the
    LoRA input only (the frozen path sees the clean rows), as in PEFT.
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"impl={impl!r}: use one of {EXPERT_IMPLS}.")
    a_gu, b_gu, a_d, b_d = lora
    num_experts, width = down_EHF.shape[0], down_EHF.shape[-1]
    tensors = (x_NH, gate_up_EFH2, down_EHF, a_gu, b_gu, a_d, b_d)
    rank = a_gu.shape[1]
    can_grouped = (
        len({t.dtype for t in tensors}) == 1
        and grouped_mm_supported(x_NH.device, x_NH.dtype)
        and all(aligned_16(t) for t in tensors)
        and all((n * x_NH.element_size()) % 16 == 0 for n in (width, rank))
    )
    if impl == "grouped_mm" and not can_grouped:
        raise ValueError(
            f"impl='grouped_mm' is not usable for {x_NH.device.type}/{x_NH.dtype} with these shapes "
            "(needs torch._grouped_mm, equal dtypes, 16-byte aligned F and rank): use impl='auto' or 'loop'."
        )
    use_grouped = can_grouped and impl != "loop"
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32) if use_grouped else None

    gate_up_N2F = _segment_matmul(x_NH, gate_up_EFH2, counts_E, offs_E)
    low_NR = _segment_matmul(dropout(x_NH), a_gu, counts_E, offs_E)
    gate_up_N2F = gate_up_N2F + scale * _segment_matmul(low_NR, b_gu, counts_E, offs_E)
    h_NF = act(gate_up_N2F[:, :width]) * gate_up_N2F[:, width:]
    y_NH = _segment_matmul(h_NF, down_EHF, counts_E, offs_E)
    low_NR = _segment_matmul(dropout(h_NF), a_d, counts_E, offs_E)
    y_NH = y_NH + scale * _segment_matmul(low_NR, b_d, counts_E, offs_E)
    if bias_EH is not None:
        expert_N = torch.repeat_interleave(
            torch.arange(num_experts, device=counts_E.device), counts_E, output_size=x_NH.shape[0]
        )
        y_NH = y_NH + bias_EH.index_select(0, expert_N)
    return y_NH


class LoraDiveExperts(nn.Module):
    """A `DiveExperts` with per-expert LoRA; holds the very same base Parameters (names unchanged).

    The wrapped `DiveExperts` object is kept (unregistered) so `merge` can hand it back.
    """

    def __init__(self, base: DiveExperts, r: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.__dict__["_base"] = base  # not a submodule: parameter names stay mlp.experts.gate_up_proj, ...
        self.num_experts = base.num_experts
        self.expert_ids = base.expert_ids
        self.num_global_experts = base.num_global_experts
        self.act_fn = base.act_fn
        self.impl = base.impl
        self.gate_up_proj = base.gate_up_proj
        self.down_proj = base.down_proj
        self.bias = base.bias
        self.r, self.alpha = r, float(alpha)
        self.scale = self.alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        num_experts, width2, hidden = _shape(base.gate_up_proj)
        width = width2 // 2
        ref = base.gate_up_proj
        dtype = ref.dtype

        # Experts held by an expert-parallel layer are a subset of all experts: A is drawn for all
        # of them and sliced, so every placement gets the adapters of the single-rank model.
        ids = base.expert_ids
        drawn = base.num_global_experts

        def a_init(rows: int, cols: int) -> nn.Parameter:
            # PEFT's kaiming_uniform_(a=sqrt(5)) on an [r, in] matrix: U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(cols)
            a = torch.empty(drawn, rows, cols).uniform_(-bound, bound, generator=generator)[ids]
            return nn.Parameter(a.to(device=ref.device, dtype=dtype))

        def zeros(rows: int, cols: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(num_experts, rows, cols, device=ref.device, dtype=dtype))

        self.lora_gate_up_A = a_init(r, hidden)  # [E, R, H]
        self.lora_gate_up_B = zeros(2 * width, r)  # [E, 2F, R]
        self.lora_down_A = a_init(r, width)  # [E, R, F]
        self.lora_down_B = zeros(hidden, r)  # [E, H, R]

    @property
    def base(self) -> DiveExperts:
        return self.__dict__["_base"]

    def forward(self, x_TH: torch.Tensor, top_idx_TK: torch.Tensor, weights_TK: torch.Tensor):
        """-> (y_TH, counts_E), like DiveExperts.forward."""
        x_NH, order_N, counts_E = permute(x_TH, top_idx_TK, self.num_experts)
        y_NH = self.mlp(x_NH, counts_E)
        return unpermute(y_NH, order_N, weights_TK, x_TH.shape[0]), counts_E

    def mlp(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows -> y_NH, like DiveExperts.mlp (plus the adapters)."""
        lora = (self.lora_gate_up_A, self.lora_gate_up_B, self.lora_down_A, self.lora_down_B)
        return lora_expert_mlp(
            x_NH,
            counts_E,
            self.gate_up_proj,
            self.down_proj,
            lora,
            self.scale,
            self.act_fn,
            self.lora_dropout,
            self.bias,
            impl=self.impl,
        )

    @torch.no_grad()
    def merge(self) -> DiveExperts:
        """Fold s * B @ A into the base weights (in place, computed in fp32) and return the plain experts."""
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            raise ValueError(
                "merge_expert_lora: parameters are ZeRO-3 partitioned; gather a full state dict "
                "first (dive_ds.train.export.consolidate_*), then merge on a plain model"
            )
        for w, b, a in LORA_MERGES:
            getattr(self, w).copy_(
                merged_weight(getattr(self, w), getattr(self, b), getattr(self, a), self.scale)
            )
        base = self.base
        base.impl = self.impl
        return base

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, alpha={self.alpha:g}"


def merged_weight(
    w_EOI: torch.Tensor, b_EOR: torch.Tensor, a_ERI: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + scale * B @ A per expert, computed in fp32, in W's dtype (the LoRA merge of one projection)."""
    return (w_EOI.float() + torch.bmm(b_EOR.float(), a_ERI.float()) * scale).to(w_EOI.dtype)


def merge_lora_tensors(t: dict[str, torch.Tensor], scale: float, prefix: str = "") -> None:
    """Fold the LoRA tensors `prefix`lora_* of a state dict into `prefix`gate_up_proj / down_proj, in place."""
    for w, b, a in LORA_MERGES:
        t[prefix + w] = merged_weight(t[prefix + w], t.pop(prefix + b), t.pop(prefix + a), scale)


def add_expert_lora(
    model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.1, seed: int = 0
) -> list[nn.Parameter]:
    """Put LoRA on every MoE block's experts (in place); returns the new LoRA parameters.

    A is drawn from a generator seeded with `seed`, so every data-parallel rank builds the same
    adapters. The base expert weights are not frozen here: the caller chooses what trains.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r={r}: use r >= 1")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha={alpha}: use alpha > 0")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout={dropout}: use 0 <= dropout < 1")
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("add_expert_lora: the model has no DiveMoeBlock; pass a dive_moe model")
    generator = torch.Generator().manual_seed(seed)
    new_params: list[nn.Parameter] = []
    for block in blocks:
        if isinstance(block.experts, LoraDiveExperts):
            raise ValueError("add_expert_lora: the model already has expert LoRA; merge it first")
        block.experts = LoraDiveExperts(block.experts, r, alpha, dropout, generator)
        new_params += [getattr(block.experts, n) for n in LORA_PARAM_NAMES]
        if getattr(block, "shared_expert", None) is not None:  # the shared expert adapts too
            block.shared_expert = LoraDiveExperts(block.shared_expert, r, alpha, dropout, generator)
            new_params += [getattr(block.shared_expert, n) for n in LORA_PARAM_NAMES]
    return new_params


def merge_expert_lora(model: nn.Module) -> nn.Module:
    """Fold every expert LoRA into gate_up_proj / down_proj and remove it; returns the model."""
    for block in moe_blocks(model):
        if isinstance(block.experts, LoraDiveExperts):
            block.experts = block.experts.merge()
        if isinstance(getattr(block, "shared_expert", None), LoraDiveExperts):
            block.shared_expert = block.shared_expert.merge()
    return model


def has_expert_lora(model: nn.Module) -> bool:
    return any(isinstance(b.experts, LoraDiveExperts) for b in moe_blocks(model))


def lora_settings_from_state_dict(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The LoRA rank stored in a state dict (None when it holds no expert LoRA)."""
    for key, value in state_dict.items():
        if key.endswith(".lora_gate_up_A"):
            return int(value.shape[1])
    return None


# --------------------------------------------------------------------------- trainable parameter counts


def experts_stage_trainable(
    config: DiveMoeConfig,
    lora_r: int = 8,
    train_router: bool = True,
    router_noise: bool = True,
    train_norms: bool = True,
    train_expert_bias: bool = False,
) -> dict:
    """Trainable parameters of a sparse stage with expert LoRA (the experts stage: the arguments mirror its
    StageConfig fields and defaults), from the config alone -> {"trainable": n, "by_kind": {kind: n}}, the
    same as dive_ds.train.trainable.prepare_stage_model reports.

    lora: r * (2H + 3F_l) per expert and layer (A and B of gate_up and of down), and r * (2H + 3F_s) per layer
    for a shared expert of width F_s; router: weight [E, H] per
    layer, noise_weight too while noisy top-k is on (stage and model); norm: every RMSNorm (the decoder
    layers', the final one, the attention's own, e.g. Qwen3's q/k norms); expert_bias: [E, H] per layer.
    """
    hidden, n_layers, n_experts = config.hidden_size, config.num_hidden_layers, config.num_local_experts
    with torch.device("meta"):
        attention = DENSE_ATTENTION[config.dense_model_type](config, 0)
    attention_norms = sum(p.numel() for n, p in attention.named_parameters() if "norm" in n)
    kinds = {
        "lora": n_experts * lora_r * sum(2 * hidden + 3 * w for w in config.expert_widths())
        + (
            n_layers * lora_r * (2 * hidden + 3 * config.shared_expert_intermediate_size)
            if config.shared_expert_intermediate_size
            else 0
        ),  # fmt: skip
        "router": n_layers * n_experts * hidden if train_router else 0,
        "router_noise": n_layers * n_experts * hidden
        if train_router and router_noise and config.router_noise and config.router_noise_scale > 0
        else 0,
        "norm": n_layers * (2 * hidden + attention_norms) + hidden if train_norms else 0,
        "expert_bias": n_layers * n_experts * hidden if train_expert_bias and config.expert_bias else 0,
    }
    by_kind = {k: v for k, v in kinds.items() if v}
    return {"trainable": sum(by_kind.values()), "by_kind": by_kind}


def lora_rank_for_trainable(
    config: DiveMoeConfig,
    target_trainable: int,
    train_router: bool = True,
    router_noise: bool = True,
    train_norms: bool = True,
    train_expert_bias: bool = False,
) -> int:
    """The smallest LoRA rank whose experts-stage trainable count (`experts_stage_trainable` with these
    settings) is >= `target_trainable`: e.g. a one-expert FLAP model trained with as many parameters as a
    DIVE MoE. Refuses a rank above min(H, 2 x widest expert width): beyond it no adapter gains capacity
    (B @ A of gate_up is [2F, H], of down [H, F])."""
    stage = dict(
        train_router=train_router,
        router_noise=router_noise,
        train_norms=train_norms,
        train_expert_bias=train_expert_bias,
    )
    base = experts_stage_trainable(config, 0, **stage)["trainable"]
    per_rank = experts_stage_trainable(config, 1, **stage)["trainable"] - base
    rank = max(1, -(-(target_trainable - base) // per_rank))  # ceil division on ints
    limit = min(config.hidden_size, 2 * max(config.expert_widths()))
    if rank > limit:
        raise ValueError(
            f"{target_trainable:,} trainable parameters need LoRA rank {rank} > {limit} (= min(hidden, 2 x expert "
            "width), the full rank of every adapter): LoRA cannot match it; choose a smaller target"
        )
    return rank
