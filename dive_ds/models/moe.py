"""The DIVE Mixture-of-Experts model: a Llama decoder whose every FFN is a routed set of experts.

Embeddings, norms, rotary embedding, causal mask and LM head are Llama's own; the attention is the
dense family's own transformers module (`DENSE_ATTENTION`: Qwen2's q/k/v biases, Qwen3's q/k norms),
so a MoE reproduces the dense model it was cut from. Only each decoder layer's `mlp`
is replaced by a `DiveMoeBlock` (router `gate` + `experts`). The dispatch is split into
pure functions (`permute` -> `grouped_expert_mlp` -> `unpermute`) so that an
expert-parallel layer can put an all-to-all between them; nothing here knows about
process groups.

Shape suffixes used in names:
  B batch, S sequence, T tokens (B*S), H hidden size,
  E experts, F expert FFN width, K experts per token (K = E in dense router mode),
  N routed rows (T*K, one per token-expert pair, sorted by expert).
"""

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

logger = logging.getLogger(__name__)

ROUTER_MODES = ("sparse", "dense")
ROUTER_GATES = ("renorm", "straight_through", "switch")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
DENSE_ATTENTION: dict[str, type[nn.Module]] = {
    "llama": LlamaAttention,
    "mistral": MistralAttention,  # Llama's without biases; its sliding window is refused (check_dense_family)
    "qwen2": Qwen2Attention,  # q/k/v biases, none on o
    "qwen3": Qwen3Attention,  # RMSNorm of each query and key head; biases per attention_bias
}
"""Dense model_type -> the attention module of the MoE's decoder layers. Their decoder layer (pre-norm
residual blocks), RMSNorm and rotary embedding are the same computation as Llama's."""


# --------------------------------------------------------------------------- config


@strict
class DiveMoeConfig(LlamaConfig):
    """A Llama config plus the MoE fields; every decoder layer's FFN is a DIVE MoE block."""

    model_type = "dive_moe"
    # The dense MLP projections of LlamaConfig's plan do not exist here.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }

    num_local_experts: int = 8
    """E: experts per layer."""
    num_experts_per_tok: int = 1
    """k: experts each token is sent to in sparse router mode (1 <= k <= E)."""
    expert_intermediate_size: int | None = None
    """F: FFN width of each expert; None means intermediate_size (the dense width). With
    expert_intermediate_sizes: their maximum (filled in when None)."""
    expert_intermediate_sizes: list[int] | None = None
    """Per-layer expert widths, one per decoder layer (every expert of layer l has width [l]): for
    reconstructions whose layers keep different numbers of channels (FLAP's adaptive structure search).
    None: every layer has expert_intermediate_size. Sharded folders and expert parallelism refuse them."""
    shared_expert_intermediate_size: int = 0
    """Width of an always-on shared expert (DeepSeekMoE / Qwen-MoE style) added to the routed experts' output in
    every layer (`mlp.shared_expert`, a one-expert DiveExperts without bias); 0: none (the paper's DIVE)."""
    expert_bias: bool = True
    """Per-expert output bias [E, H] added to each expert's output before weighting (FLAP bias compensation)."""
    router_mode: str = "sparse"
    """"sparse": top-k, softmax over the k chosen logits. "dense": every expert, softmax over all E."""
    router_temperature: float | int = 1.0
    """Softmax temperature of the dense router mode (ignored in sparse mode); > 0."""
    router_gate: str = "straight_through"
    """Sparse-mode routing weights. "renorm": softmax over the k chosen logits (Mixtral; weight 1 for k=1,
    so a top-1 router gets no gradient from the loss). "straight_through": the same forward values, and
    the backward of the chosen experts' probabilities under the softmax over all E (the default).
    "switch": the chosen experts' probabilities over all E, not renormalised (Switch Transformer; the
    output is scaled by them at inference too)."""
    router_noise: bool = True
    """Noisy top-k (learned noise scale) in training mode; never applied in eval mode or dense mode."""
    router_noise_scale: float | int = 1.0
    """Constant multiplying the noise std: noise = randn * softplus(x @ noise_weight.T) * scale."""
    dense_model_type: str = "llama"
    """model_type of the dense model the MoE was cut from (a key of DENSE_ATTENTION); decides the
    attention module, so Qwen2's biases and Qwen3's q/k norms are kept. Set by `dive-ds reconstruct`."""

    def __post_init__(self, **kwargs):
        if self.expert_intermediate_sizes is not None:
            self.expert_intermediate_sizes = [int(w) for w in self.expert_intermediate_sizes]
            if self.expert_intermediate_size is None and self.expert_intermediate_sizes:
                self.expert_intermediate_size = max(self.expert_intermediate_sizes)
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        _check_moe_fields(self)
        super().__post_init__(**kwargs)

    def expert_widths(self) -> list[int]:
        """The expert FFN width of every decoder layer."""
        if self.expert_intermediate_sizes is not None:
            return list(self.expert_intermediate_sizes)
        return [self.expert_intermediate_size] * self.num_hidden_layers

    def expert_width(self, layer_idx: int | None) -> int:
        """The expert FFN width of decoder layer `layer_idx` (None: the one width all layers share)."""
        if self.expert_intermediate_sizes is None:
            return self.expert_intermediate_size
        if layer_idx is None:
            raise ValueError(
                "this MoE has per-layer expert widths (expert_intermediate_sizes): build its experts with their "
                "layer_idx; expert parallelism and sharded folders do not support per-layer widths"
            )
        return self.expert_intermediate_sizes[layer_idx]


def _check_moe_fields(config: DiveMoeConfig) -> None:
    num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
    if num_experts < 1:
        raise ValueError(f"num_local_experts={num_experts}: a MoE layer needs at least one expert.")
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"num_experts_per_tok={top_k} with num_local_experts={num_experts}: "
            f"choose num_experts_per_tok between 1 and {num_experts}."
        )
    if config.shared_expert_intermediate_size < 0:
        raise ValueError(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: use 0 (no shared "
            "expert) or a positive width."
        )
    if config.expert_intermediate_size < 1:
        raise ValueError(
            f"expert_intermediate_size={config.expert_intermediate_size}: set a positive expert FFN width."
        )
    sizes = config.expert_intermediate_sizes
    if sizes is not None:
        if len(sizes) != config.num_hidden_layers or min(sizes, default=0) < 1:
            raise ValueError(
                f"expert_intermediate_sizes={sizes}: give one positive width per layer "
                f"({config.num_hidden_layers} layers), or None for one width"
            )
        if config.expert_intermediate_size != max(sizes):
            raise ValueError(
                f"expert_intermediate_size={config.expert_intermediate_size} with expert_intermediate_sizes: "
                f"it must be their maximum ({max(sizes)}); leave it None"
            )
    if config.router_mode not in ROUTER_MODES:
        raise ValueError(f"router_mode={config.router_mode!r}: use one of {ROUTER_MODES}.")
    if config.router_gate not in ROUTER_GATES:
        raise ValueError(f"router_gate={config.router_gate!r}: use one of {ROUTER_GATES}.")
    if not config.router_temperature > 0:
        raise ValueError(
            f"router_temperature={config.router_temperature}: use a temperature > 0 (1.0 = plain softmax)."
        )
    if config.router_noise_scale < 0:
        raise ValueError(
            f"router_noise_scale={config.router_noise_scale}: use a scale >= 0 (or router_noise=False)."
        )
    if config.dense_model_type not in DENSE_ATTENTION:
        raise ValueError(
            f"dense_model_type={config.dense_model_type!r}: the DIVE MoE has attention modules for "
            f"{', '.join(DENSE_ATTENTION)} only."
        )
    if config.mlp_bias:
        raise ValueError(
            "mlp_bias=True: DIVE experts have no gate/up/down biases (only the per-expert output bias, "
            "expert_bias). Set mlp_bias=False."
        )


def sliding_window_in_use(config) -> int | None:
    """The attention window of a (dense or MoE) config when some layer attends through one shorter than
    the context; None when every layer's attention is full causal attention."""
    window = getattr(config, "sliding_window", None)
    if window is None or window >= config.max_position_embeddings:
        return None
    layer_types = getattr(config, "layer_types", None)  # Qwen2/3: per layer; Mistral: none, every layer
    return window if layer_types is None or "sliding_attention" in layer_types else None


def check_dense_family(config) -> None:
    """Refuse, naming it, a dense model the DIVE MoE cannot reproduce exactly (one line, before any work)."""
    family = getattr(config, "model_type", "?")
    if family not in DENSE_ATTENTION:
        raise ValueError(
            f"model_type {family!r}: the DIVE MoE reproduces only the {', '.join(DENSE_ATTENTION)} families "
            "(their attention, Llama's decoder layer, norms and rotary embedding); pass a model of one of them"
        )
    window = sliding_window_in_use(config)
    if window is not None:
        raise ValueError(
            f"model_type {family!r} with sliding_window={window} < max_position_embeddings="
            f"{config.max_position_embeddings}: the DIVE MoE attends with a full causal mask, so it would "
            f"differ from the dense model beyond {window} tokens; use a checkpoint without a sliding window"
        )


# --------------------------------------------------------------------------- dispatch (pure functions)


def permute(x_TH: torch.Tensor, top_idx_TK: torch.Tensor, num_experts: int):
    """Sort the (token, expert) pairs by expert id so each expert's rows are one contiguous segment.

    Returns (x_NH, order_N, counts_E): x_NH[i] is the input of pair order_N[i], a flat index
    into [T, K] (so its source token is order_N[i] // K); the sort is stable, so within an
    expert tokens keep their order. counts_E[e] is the number of rows of expert e.
    """
    k = top_idx_TK.shape[1]
    flat_N = top_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    x_NH = x_TH.index_select(0, order_N // k)
    # scatter_add, not bincount: bincount syncs with the host on CUDA.
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat_N.device)
    counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))
    return x_NH, order_N, counts_E


def unpermute(
    y_NH: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Inverse of `permute`: weight each row by its routing weight and sum each token's K rows -> [T, H]."""
    k = weights_TK.shape[1]
    w_N = weights_TK.reshape(-1).index_select(0, order_N).to(y_NH.dtype)
    # index_copy back to [T*K, H] then a sum over K: deterministic, unlike an atomic index_add.
    y_unsorted = y_NH.new_zeros(num_tokens * k, y_NH.shape[1]).index_copy(0, order_N, y_NH * w_N[:, None])
    return y_unsorted.view(num_tokens, k, -1).sum(dim=1)


_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward for this device type and dtype (probed once)."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        _GROUPED_MM_SUPPORT[key] = _probe_grouped_mm(torch.device(device), dtype)
    return _GROUPED_MM_SUPPORT[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        # The probe may run inside a checkpointed forward: identity saved-tensor hooks keep its
        # tensors away from torch.utils.checkpoint (which would see them once, not on recompute).
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            # No torch.randn: the probe must not move the global RNG (routing noise draws from it).
            a = torch.linspace(-1, 1, 96, device=device, dtype=dtype).view(6, 16).requires_grad_()
            b = torch.linspace(1, -1, 256, device=device, dtype=dtype).view(2, 8, 16).requires_grad_()
            offs = torch.tensor([2, 6], device=device, dtype=torch.int32)
            y = grouped_mm_checked(a, b.transpose(-2, -1), offs)
            # sum() sends an expanded (stride-0) gradient: the case _GradForGroupedMm exists for.
            y.float().sum().backward()
            ref = torch.cat([a[:2] @ b[0].T, a[2:] @ b[1].T]).float()
            return bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class _GradForGroupedMm(torch.autograd.Function):
    """Identity whose backward hands on a contiguous, aligned gradient.

    The backward of torch._grouped_mm rejects gradients with stride 0 (e.g. from a .sum())
    or strides that are not multiples of 16 bytes.
    """

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if grad.is_contiguous() and aligned_16(grad):
            return grad
        return grad.clone(memory_format=torch.contiguous_format)


def grouped_mm_checked(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _GradForGroupedMm.apply(torch._grouped_mm(a, b, offs=offs))


def aligned_16(t: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned base pointers and strides.
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride() if s != 1)


def _can_grouped_mm(x_NH: torch.Tensor, gate_up_EFH2: torch.Tensor, down_EHF: torch.Tensor) -> bool:
    if not (x_NH.dtype == gate_up_EFH2.dtype == down_EHF.dtype):
        return False
    if not grouped_mm_supported(x_NH.device, x_NH.dtype):
        return False
    width = down_EHF.shape[-1]
    return (
        all(aligned_16(t) for t in (x_NH, gate_up_EFH2, down_EHF)) and (width * x_NH.element_size()) % 16 == 0
    )


def grouped_expert_mlp(
    x_NH: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_EFH2: torch.Tensor,
    down_EHF: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    bias_EH: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Run each expert's gated FFN on its contiguous segment of rows -> y_NH.

    gate_up_EFH2 is [E, 2F, H] (gate rows first, then up rows: Mixtral's fused layout),
    down_EHF is [E, H, F]. impl: "grouped_mm" (one torch._grouped_mm per projection),
    "loop" (one matmul per expert segment), or "auto" (grouped_mm when it works for this
    device, dtype and memory alignment, else loop).
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"impl={impl!r}: use one of {EXPERT_IMPLS}.")
    num_experts, width = down_EHF.shape[0], down_EHF.shape[-1]
    use_grouped = impl == "grouped_mm" or (impl == "auto" and _can_grouped_mm(x_NH, gate_up_EFH2, down_EHF))
    if impl == "grouped_mm" and not _can_grouped_mm(x_NH, gate_up_EFH2, down_EHF):
        raise ValueError(
            f"impl='grouped_mm' is not usable for {x_NH.device.type}/{x_NH.dtype} with these shapes "
            "(needs torch._grouped_mm, equal dtypes, 16-byte aligned H and F): use impl='auto' or 'loop'."
        )

    if use_grouped:
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        gate_up_N2F = grouped_mm_checked(x_NH, gate_up_EFH2.transpose(-2, -1), offs_E)
        h_NF = act(gate_up_N2F[:, :width]) * gate_up_N2F[:, width:]
        y_NH = grouped_mm_checked(h_NF, down_EHF.transpose(-2, -1), offs_E)
        if bias_EH is not None:
            expert_N = torch.repeat_interleave(
                torch.arange(num_experts, device=counts_E.device), counts_E, output_size=x_NH.shape[0]
            )
            y_NH = y_NH + bias_EH.index_select(0, expert_N)
        return y_NH

    segments = torch.split(x_NH, counts_E.tolist())
    outputs = []
    for e, x_seg in enumerate(segments):
        gate_up = F.linear(x_seg, gate_up_EFH2[e])
        y_seg = F.linear(act(gate_up[:, :width]) * gate_up[:, width:], down_EHF[e])
        outputs.append(y_seg if bias_EH is None else y_seg + bias_EH[e])
    return torch.cat(outputs, dim=0)


# --------------------------------------------------------------------------- modules


class RouterOutput(NamedTuple):
    top_idx_TK: torch.Tensor
    """Chosen experts per token (all E experts in dense mode)."""
    weights_TK: torch.Tensor
    """Routing weight of each chosen expert (fp32); sums to 1 over K."""
    probs_TE: torch.Tensor
    """Full softmax over all experts (tempered in dense mode), for monitoring."""
    logits_TE: torch.Tensor
    """Clean router logits (fp32), e.g. for an auxiliary loss."""


class DiveRouter(nn.Module):
    """Linear router (no bias) with the learned noise scale of noisy top-k gating."""

    def __init__(self, config: DiveMoeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.mode = config.router_mode
        self.temperature = float(config.router_temperature)
        self.noise = config.router_noise
        self.noise_scale = float(config.router_noise_scale)
        self.gate_kind = config.router_gate
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        self.noise_weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TH, self.weight).float()
        if self.mode == "dense":
            probs_TE = torch.softmax(logits_TE / self.temperature, dim=-1)
            top_idx_TK = torch.arange(self.num_experts, device=x_TH.device).expand(x_TH.shape[0], -1)
            return RouterOutput(top_idx_TK, probs_TE, probs_TE, logits_TE)

        select_TE = logits_TE
        if self.training and self.noise and self.noise_scale > 0:
            noise_std_TE = F.softplus(F.linear(x_TH, self.noise_weight).float()) * self.noise_scale
            select_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        top_logits_TK, top_idx_TK = torch.topk(select_TE, self.top_k, dim=-1)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return RouterOutput(
            top_idx_TK, gate_weights(top_logits_TK, probs_TE, top_idx_TK, self.gate_kind), probs_TE, logits_TE
        )

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, mode={self.mode}, temperature={self.temperature}, "
            f"gate={self.gate_kind}"
        )


def gate_weights(
    top_logits_TK: torch.Tensor, probs_TE: torch.Tensor, top_idx_TK: torch.Tensor, kind: str
) -> torch.Tensor:
    """Routing weights of the chosen experts (see DiveMoeConfig.router_gate)."""
    if kind == "switch":
        return probs_TE.gather(1, top_idx_TK)
    # softmax over the k chosen logits == Mixtral's softmax over E, top-k, renormalise.
    renorm_TK = torch.softmax(top_logits_TK, dim=-1)
    if kind == "renorm":
        return renorm_TK
    chosen_TK = probs_TE.gather(1, top_idx_TK)
    return renorm_TK + (chosen_TK - chosen_TK.detach())


class DiveExperts(nn.Module):
    """E gated FFN experts stored as 3-D tensors (Mixtral's fused layout) plus an optional output bias."""

    def __init__(
        self,
        config: DiveMoeConfig,
        expert_ids: list[int] | None = None,
        layer_idx: int | None = None,
        shared: bool = False,
    ):
        super().__init__()
        if expert_ids is not None and not all(0 <= e < config.num_local_experts for e in expert_ids):
            raise ValueError(f"expert_ids={expert_ids}: use ids in [0, {config.num_local_experts}).")
        num_experts, hidden, width = (
            len(expert_ids) if expert_ids is not None else config.num_local_experts,
            config.hidden_size,
            config.expert_width(layer_idx),
        )
        if shared:  # the always-on shared expert: one expert of its own width, no output bias
            num_experts, width, expert_ids = 1, config.shared_expert_intermediate_size, [0]
        self.num_experts = num_experts
        self.expert_ids = list(expert_ids) if expert_ids is not None else list(range(num_experts))
        """Global ids of the experts held here (a subset when an expert-parallel layer owns them)."""
        self.num_global_experts = 1 if shared else config.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))
        self.bias = (
            nn.Parameter(torch.empty(num_experts, hidden)) if config.expert_bias and not shared else None
        )
        self.act_fn = ACT2FN[config.hidden_act]
        self.impl = "auto"
        """Dispatch implementation for grouped_expert_mlp: "auto", "grouped_mm" or "loop"."""

    def mlp(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows (counts_E rows per held expert, in order) -> y_NH."""
        return grouped_expert_mlp(
            x_NH, counts_E, self.gate_up_proj, self.down_proj, self.act_fn, self.bias, impl=self.impl
        )

    def forward(self, x_TH: torch.Tensor, top_idx_TK: torch.Tensor, weights_TK: torch.Tensor):
        """-> (y_TH, counts_E)."""
        x_NH, order_N, counts_E = permute(x_TH, top_idx_TK, self.num_experts)
        y_NH = self.mlp(x_NH, counts_E)
        return unpermute(y_NH, order_N, weights_TK, x_TH.shape[0]), counts_E


def add_shared(block: nn.Module, x_TH: torch.Tensor, y_TH: torch.Tensor) -> torch.Tensor:
    """y + the block's shared expert on every token (weight 1); y itself when the block has none."""
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        return y_TH
    counts = torch.tensor([x_TH.shape[0]], dtype=torch.long, device=x_TH.device)
    return y_TH + shared.mlp(x_TH, counts).to(y_TH.dtype)


class DiveMoeBlock(nn.Module):
    """Router + experts, a drop-in replacement for a Llama MLP: [B, S, H] -> [B, S, H].

    After each forward: `last_expert_counts` (LongTensor [E], rows per expert) and
    `last_router_entropy` (mean entropy of the full softmax over E; None when the router
    was bypassed), both detached and left on the device.
    """

    def __init__(self, config: DiveMoeConfig, layer_idx: int | None = None):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.gate = DiveRouter(config)
        self.experts = DiveExperts(config, layer_idx=layer_idx)
        if config.shared_expert_intermediate_size:
            self.shared_expert = DiveExperts(config, shared=True)
            """Always on, weight 1, beside the routed experts (shared_expert_intermediate_size > 0 only)."""
        self.forced_expert: int | None = None
        """Oracle routing: when set, every token goes to this expert with weight 1 (router bypassed)."""
        self.last_expert_counts: torch.Tensor | None = None
        self.last_router_entropy: torch.Tensor | None = None

    def forward(self, hidden_states_BSH: torch.Tensor) -> torch.Tensor:
        shape = hidden_states_BSH.shape
        x_TH = hidden_states_BSH.reshape(-1, shape[-1])
        top_idx_TK, weights_TK, entropy = self.route(x_TH)
        y_TH, counts_E = self.experts(x_TH, top_idx_TK, weights_TK)
        self.last_expert_counts = counts_E.detach()
        self.last_router_entropy = entropy
        return add_shared(self, x_TH, y_TH).view(shape)

    def route(self, x_TH: torch.Tensor):
        """-> (top_idx_TK, weights_TK, entropy): the router's choice, or the forced expert (oracle)."""
        if self.forced_expert is not None:
            top_idx_TK = torch.full(
                (x_TH.shape[0], 1), self.forced_expert, dtype=torch.long, device=x_TH.device
            )
            return top_idx_TK, torch.ones(x_TH.shape[0], 1, device=x_TH.device), None
        routed = self.gate(x_TH)
        with torch.no_grad():
            entropy = -torch.special.xlogy(routed.probs_TE, routed.probs_TE).sum(-1).mean()
        return routed.top_idx_TK, routed.weights_TK, entropy


class DiveMoeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose `mlp` is a DiveMoeBlock and whose attention is the dense family's
    (forward is Llama's)."""

    def __init__(self, config: DiveMoeConfig, layer_idx: int):
        # Skip LlamaDecoderLayer.__init__: it would allocate (and init) a dense MLP we throw away.
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = DENSE_ATTENTION[config.dense_model_type](config=config, layer_idx=layer_idx)
        self.mlp = DiveMoeBlock(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DiveMoePreTrainedModel(LlamaPreTrainedModel):
    config_class = DiveMoeConfig
    config: DiveMoeConfig
    _no_split_modules = ["DiveMoeDecoderLayer"]
    # The loop dispatch reads expert counts on the host (a graph break).
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": DiveMoeDecoderLayer,
        "attentions": list(DENSE_ATTENTION.values()),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DiveRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.noise_weight)
        elif isinstance(module, DiveExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        align_expert_weights(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded


class DiveMoeModel(DiveMoePreTrainedModel, LlamaModel):
    """LlamaModel with DiveMoeDecoderLayer layers (forward is Llama's)."""

    config_class = DiveMoeConfig

    def __init__(self, config: DiveMoeConfig):
        # Skip LlamaModel.__init__ (it builds dense layers); build the same modules with MoE layers.
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DiveMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DiveMoeForCausalLM(DiveMoePreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM over a DiveMoeModel (forward, loss and generate are Llama's)."""

    config_class = DiveMoeConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DiveMoeConfig):
        PreTrainedModel.__init__(self, config)
        self.model = DiveMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def align_expert_weights(model: nn.Module) -> None:
    """Copy expert weights that are not 16-byte aligned into fresh (aligned) storage.

    Weights loaded from a memory-mapped safetensors file on CPU sit at 8-byte offsets,
    which torch._grouped_mm refuses; without this the dispatch silently takes the loop
    path (slower, and not bit-identical to the model that was saved).
    """
    for experts in (m for m in model.modules() if isinstance(m, DiveExperts)):
        for param in experts.parameters(recurse=False):
            if param.data_ptr() % 16:
                param.data = param.data.clone()


def moe_blocks(model: nn.Module) -> list[DiveMoeBlock]:
    """All DiveMoeBlocks of a model, in layer order."""
    return [m for m in model.modules() if isinstance(m, DiveMoeBlock)]


@contextlib.contextmanager
def route_all_to(model: nn.Module, expert_idx: int) -> Iterator[None]:
    """Oracle routing: inside the block every token of every layer goes to `expert_idx` with weight 1."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("route_all_to: the model has no DiveMoeBlock; pass a dive_moe model.")
    for block in blocks:
        if not 0 <= expert_idx < block.num_experts:
            raise ValueError(f"expert_idx={expert_idx}: use an expert index in [0, {block.num_experts}).")
    previous = [block.forced_expert for block in blocks]
    try:
        for block in blocks:
            block.forced_expert = expert_idx
        yield
    finally:
        for block, forced in zip(blocks, previous):
            block.forced_expert = forced


def set_router_mode(model: nn.Module, mode: str, temperature: float | None = None) -> None:
    """Switch every router to "sparse" or "dense" (and set the dense temperature); updates model.config too."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"mode={mode!r}: use one of {ROUTER_MODES}.")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature={temperature}: use a temperature > 0 (1.0 = plain softmax).")
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("set_router_mode: the model has no DiveMoeBlock; pass a dive_moe model.")
    for block in blocks:
        block.gate.mode = mode
        if temperature is not None:
            block.gate.temperature = float(temperature)
    config = getattr(model, "config", None)
    if isinstance(config, DiveMoeConfig):
        config.router_mode = mode
        if temperature is not None:
            config.router_temperature = float(temperature)


def count_parameters(config: DiveMoeConfig) -> dict[str, int]:
    """Total and activated parameter counts from the config alone.

    Activated = everything but the experts, plus k experts' worth per layer (the sparse
    top-k figure, also reported for a model in dense router mode). Tied embeddings count once.
    Per-layer expert widths (expert_intermediate_sizes) count layer by layer.
    """
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    with torch.device("meta"):  # the family's own module: its biases and q/k norms count as they are
        attention = sum(p.numel() for p in DENSE_ATTENTION[config.dense_model_type](config, 0).parameters())
    norms = 2 * hidden
    router = 2 * config.num_local_experts * hidden  # weight + noise_weight
    # one expert of every layer, summed over the layers
    experts_one_each = sum(
        3 * w * hidden + (hidden if config.expert_bias else 0) for w in config.expert_widths()
    )
    shared = vocab * hidden + hidden + (0 if config.tie_word_embeddings else vocab * hidden)
    per_layer_shared = attention + norms + router + 3 * config.shared_expert_intermediate_size * hidden
    total = shared + layers * per_layer_shared + config.num_local_experts * experts_one_each
    activated = shared + layers * per_layer_shared + config.num_experts_per_tok * experts_one_each
    return {"total": total, "activated": activated}


def register() -> None:
    """Make "dive_moe" known to AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register("dive_moe", DiveMoeConfig, exist_ok=True)
    AutoModel.register(DiveMoeConfig, DiveMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(DiveMoeConfig, DiveMoeForCausalLM, exist_ok=True)
