"""Expert parallelism for the DIVE MoE block, as a member of DeepSpeed's AutoEP layer family.

DeepSpeed 0.19.8 refuses its native MoE layer under ZeRO-3; the path it supports for ZeRO-3 with
expert parallelism is AutoEP, whose engine recognises `isinstance(module, AutoEPMoELayer)`:
it binds the layer's expert-parallel group (`set_deepspeed_parallelism`), reduces parameters
tagged `allreduce=False` over the expert-data-parallel group and partitions them there under
ZeRO-3 (`ds_zero_placement_family="autoep_expert"`), and keeps the rest on the data-parallel
group. AutoEP's own replacement (`expert_parallel` in the DeepSpeed JSON) only knows Hugging Face
Mixtral/Qwen/DeepSeek blocks and builds `GroupedExperts` (w1/w2/w3, no bias) with its own router:
DIVE needs the per-expert FLAP bias, dense tempered routing for the router stage, noisy top-k and
LoRA on the experts. So `DiveEPMoeBlock` subclasses `AutoEPMoELayer` (for the engine) and
`DiveMoeBlock` (for DIVE), keeps DIVE's router and experts, and composes AutoEP's split plan and
autograd all-to-all (`compute_split_plan`, `_AllToAllV`) for the exchange:

    route (replicated) -> permute by global expert -> all-to-all rows to the experts' ranks ->
    regroup by local expert -> expert MLP (+bias, +LoRA) -> inverse regroup -> all-to-all back ->
    unpermute and weight.

No token is ever dropped: the splits are the exact counts (no capacity factor).
Parameter names are those of the single-rank model (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
[E_local, 2F, H], ...), so checkpoints map back by expert id.

The DeepSpeed internals used here are pinned by setup.cfg (deepspeed==0.19.8) and checked by
tests/parallel/test_expert_parallel.py::test_deepspeed_autoep_internals.

Legend: T tokens, H hidden, E experts (global), El experts on this rank, P ep size, N routed rows.
"""

from __future__ import annotations

import torch
from torch import nn

from dive_ds.io.placement import experts_of_ep_rank
from dive_ds.models.moe import (
    DiveExperts,
    DiveMoeBlock,
    DiveMoeConfig,
    DiveRouter,
    add_shared,
    permute,
    unpermute,
)

EP_FAMILY = "autoep_expert"


def ep_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert-parallel group of size P (and its expert-data-parallel twin)."""
    return f"ep_size_{ep_size}"


def group_by_local_expert(counts_PE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows received from P source ranks (source-major, local-expert-minor) -> expert-major order.

    counts_PE[s, e] rows of local expert e came from source s; they arrive as
    [s0e0, s0e1, ..., s1e0, ...]. Returns (index_N, counts_E): rows_in_expert_order =
    received[index_N], counts_E[e] = rows of local expert e (summed over sources).
    """
    p, e = counts_PE.shape
    flat = counts_PE.reshape(-1).long()
    start_PE = (torch.cumsum(flat, 0) - flat).view(p, e)
    counts_t = counts_PE.t().reshape(-1).long()  # expert-major segments
    start_t = start_PE.t().reshape(-1)
    n = int(counts_t.sum())
    seg_out = torch.cumsum(counts_t, 0) - counts_t
    index_N = (
        torch.arange(n, device=counts_PE.device)
        - torch.repeat_interleave(seg_out, counts_t, output_size=n)
        + torch.repeat_interleave(start_t, counts_t, output_size=n)
    )
    return index_N, counts_PE.sum(0).long()


def _autoep_base():
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    return AutoEPMoELayer


def _make_block_class():
    base = _autoep_base()

    class DiveEPMoeBlock(DiveMoeBlock, base):
        """A DIVE MoE block whose experts are spread over an expert-parallel group of size P.

        Built directly with this rank's experts (never the whole layer). `ep_group` is bound by
        the DeepSpeed engine (`set_deepspeed_parallelism`, inherited) or by `bind_group` in tests.
        """

        def __init__(self, config: DiveMoeConfig, ep_size: int, ep_rank: int):
            nn.Module.__init__(self)  # neither parent's __init__: no full expert set, no HF source module
            self.num_experts = config.num_local_experts
            self.ep_size, self.ep_rank = ep_size, ep_rank
            self.local_experts = experts_of_ep_rank(config.num_local_experts, ep_size, ep_rank)
            self.num_local_experts = len(self.local_experts)
            self.top_k = config.num_experts_per_tok
            self.hidden_size = config.hidden_size
            # what AutoEPMoELayer.set_deepspeed_parallelism reads
            self.ep_group_name = ep_group_name(ep_size)
            self.ep_group = None
            self.folding_group_handles = None
            self.tp_group = None
            self.combine_impl = "weighted_sum"
            self.comm_backend = "comm"
            self.gate = DiveRouter(config)
            self.experts = DiveExperts(config, expert_ids=self.local_experts)
            if config.shared_expert_intermediate_size:  # replicated on every rank, like attention
                self.shared_expert = DiveExperts(config, shared=True)
            self.forced_expert = None
            self.last_expert_counts = None
            self.last_router_entropy = None
            tag_parameters(self)

        def bind_group(self, group) -> None:
            self.ep_group = group

        def forward(self, hidden_states_BSH: torch.Tensor) -> torch.Tensor:
            shape = hidden_states_BSH.shape
            x_TH = hidden_states_BSH.reshape(-1, shape[-1])
            top_idx_TK, weights_TK, entropy = self.route(x_TH)
            x_NH, order_N, counts_E = permute(x_TH, top_idx_TK, self.num_experts)
            y_NH = self.exchange_and_compute(x_NH, counts_E)
            self.last_expert_counts = counts_E.detach()
            self.last_router_entropy = entropy
            return add_shared(self, x_TH, unpermute(y_NH, order_N, weights_TK, x_TH.shape[0])).view(shape)

        def exchange_and_compute(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
            """Rows sorted by global expert (this rank's tokens) -> their expert outputs, same order."""
            if self.ep_size == 1:
                return self.experts.mlp(x_NH, counts_E)
            if self.ep_group is None:
                raise RuntimeError(
                    "DiveEPMoeBlock: no expert-parallel group bound; build the engine with "
                    "deepspeed.initialize (it calls set_deepspeed_parallelism) or call bind_group"
                )
            from deepspeed.module_inject.auto_ep_layer import _AllToAllV, compute_split_plan

            plan = compute_split_plan(
                selected_experts=None,
                num_experts=self.num_experts,
                ep_size=self.ep_size,
                num_local_experts=self.num_local_experts,
                ep_group=self.ep_group,
                num_tokens_per_expert=counts_E,
            )
            recv_NH = _AllToAllV.apply(self.ep_group, x_NH, plan.input_splits, plan.output_splits)
            index_N, local_counts = group_by_local_expert(plan.local_counts_by_source)
            y_local = self.experts.mlp(recv_NH.index_select(0, index_N), local_counts)
            y_recv = y_local.new_empty(y_local.shape).index_copy(0, index_N, y_local)
            return _AllToAllV.apply(self.ep_group, y_recv, plan.output_splits, plan.input_splits)

        def extra_repr(self) -> str:
            return f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, experts={self.local_experts}"

    return DiveEPMoeBlock


_BLOCK_CLASS = None


def ep_block_class():
    """The DiveEPMoeBlock class (built on first use: importing DeepSpeed is slow)."""
    global _BLOCK_CLASS
    if _BLOCK_CLASS is None:
        _BLOCK_CLASS = _make_block_class()
    return _BLOCK_CLASS


def tag_parameters(block: nn.Module) -> None:
    """Tag a block's parameters the way AutoEP does: experts (and their LoRA) reduce and ZeRO-partition
    over the expert-data-parallel group; the router is replicated over the data-parallel group.
    Call again after adding LoRA."""
    name = ep_group_name(block.ep_size)
    for p in block.experts.parameters():
        p.allreduce = False
        p.group_name = name
        p.ds_zero_placement_family = EP_FAMILY
        p.ds_zero_partition_group_name = name
    for p in block.gate.parameters():
        p.allreduce = True
        p.ds_zero_placement_family = "replicated"


def retag_model(model: nn.Module) -> int:
    """tag_parameters on every expert-parallel block of a model -> number of blocks."""
    cls = ep_block_class()
    blocks = [m for m in model.modules() if isinstance(m, cls)]
    for b in blocks:
        tag_parameters(b)
    return len(blocks)


@torch.no_grad()
def ep_block_from(block: DiveMoeBlock, config: DiveMoeConfig, ep_size: int, ep_rank: int) -> nn.Module:
    """A DiveEPMoeBlock holding this rank's slice of a full single-rank block (tests, small models)."""
    ep = ep_block_class()(config, ep_size, ep_rank)
    ep.gate.load_state_dict(block.gate.state_dict())
    ids = torch.tensor(ep.local_experts)
    for name, p in ep.experts.named_parameters():
        p.copy_(getattr(block.experts, name)[ids])
    ep.gate.mode, ep.gate.temperature, ep.gate.noise, ep.gate.gate_kind = (
        block.gate.mode,
        block.gate.temperature,
        block.gate.noise,
        block.gate.gate_kind,
    )
    ep.experts.impl = block.experts.impl
    if getattr(block, "shared_expert", None) is not None:
        ep.shared_expert.load_state_dict(block.shared_expert.state_dict())
        ep.shared_expert.impl = block.shared_expert.impl
    return ep
