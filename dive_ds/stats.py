"""Channel statistics of the FFN's down_proj input and the FLAP scores built on them.

Pure functions, float64. Legend: D domains, L layers, F FFN channels, H hidden size.

Sufficient statistics per (domain, layer, channel): token count n, sum s, sum of squares q.
They merge exactly by addition, so any grouping of domains gets its statistics without
touching the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("wifv", "ifv", "wifn")


@dataclass
class ChannelStats:
    """Statistics for a set of domains (or one merged group)."""

    count_D: torch.Tensor
    """[D] float64 tokens per domain (same for every layer); for token clusters [C, L] (each layer's own)."""
    sum_DLF: torch.Tensor
    """[D, L, F] float64 per-channel sum of the down_proj input."""
    sumsq_DLF: torch.Tensor
    """[D, L, F] float64 per-channel sum of squares."""
    mlp_in_sum_DLH: torch.Tensor
    """[D, L, H] float64 sum of the MLP input (post-attention-norm hidden state): router init."""
    down_colsq_LF: torch.Tensor
    """[L, F] float64 sum_i W_down[i, j]^2 (WIFV weight)."""
    down_colabs_LF: torch.Tensor
    """[L, F] float64 sum_i |W_down[i, j]| (WIFN weight)."""

    def merged(self, idx: list[int]) -> ChannelStats:
        """Exact statistics of the union of the domains `idx` (a one-domain ChannelStats)."""
        ix = torch.as_tensor(idx, dtype=torch.long)
        return ChannelStats(
            self.count_D[ix].sum(0, keepdim=True),
            self.sum_DLF[ix].sum(0, keepdim=True),
            self.sumsq_DLF[ix].sum(0, keepdim=True),
            self.mlp_in_sum_DLH[ix].sum(0, keepdim=True),
            self.down_colsq_LF,
            self.down_colabs_LF,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "count": self.count_D,
            "sum": self.sum_DLF,
            "sumsq": self.sumsq_DLF,
            "mlp_in_sum": self.mlp_in_sum_DLH,
            "down_colsq": self.down_colsq_LF,
            "down_colabs": self.down_colabs_LF,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ChannelStats:
        return cls(t["count"], t["sum"], t["sumsq"], t["mlp_in_sum"], t["down_colsq"], t["down_colabs"])


def mean_var(count: torch.Tensor, s: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance from (n, sum, sum of squares); count broadcasts."""
    n = count.to(torch.float64)
    while n.dim() < s.dim():
        n = n.unsqueeze(-1)
    mean = s / n
    var = (q - s * mean) / (n - 1).clamp_min(1)
    return mean, var.clamp_min(0)


def channel_scores(stats: ChannelStats, method: str = "wifv") -> torch.Tensor:
    """[D, L, F] FLAP channel importance.

    wifv: unbiased variance * sum_i W_down[i, j]^2 (the paper's default, fluctuation metric)
    ifv:  unbiased variance alone
    wifn: sqrt(E[x_j^2]) * sum_i |W_down[i, j]| (weighted input norm)
    """
    if method not in SCORES:
        raise ValueError(f"unknown score {method!r}; choose one of {SCORES}")
    _, var = mean_var(stats.count_D, stats.sum_DLF, stats.sumsq_DLF)
    if method == "wifv":
        return var * stats.down_colsq_LF
    if method == "ifv":
        return var
    n = stats.count_D.to(torch.float64).reshape(stats.count_D.shape[0], -1, 1)  # [D] or per layer [C, L]
    return (stats.sumsq_DLF / n).sqrt() * stats.down_colabs_LF


def n_keep(width: int, prune_ratio: float) -> int:
    """Channels kept when pruning `prune_ratio` of `width` (at least one)."""
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1) (got {prune_ratio}); e.g. 0.5 keeps half the FFN")
    return max(1, round(width * (1.0 - prune_ratio)))


def kept_channels(scores_LF: torch.Tensor, keep: int) -> torch.Tensor:
    """[L, keep] indices of the highest-scoring channels per layer, ascending (ties -> lower index)."""
    order = torch.sort(scores_LF, dim=-1, descending=True, stable=True).indices[..., :keep]
    return order.sort(dim=-1).values


def compensation_bias(w_down_HF: torch.Tensor, mean_F: torch.Tensor, kept_K: torch.Tensor) -> torch.Tensor:
    """FLAP bias compensation b = W_down[:, removed] @ mean[removed] ([H], float64 math)."""
    removed = torch.ones(w_down_HF.shape[1], dtype=torch.bool, device=w_down_HF.device)
    removed[kept_K.to(w_down_HF.device)] = False
    return w_down_HF[:, removed].to(torch.float64) @ mean_F[removed].to(torch.float64)


# --------------------------------------------------------------------------- baselines' channel choices


def random_channel_sets(
    ffn: int, n_experts: int, n_layers: int, keep: int, generator: torch.Generator
) -> torch.Tensor:
    """[E, L, keep] random channel sets per layer, ascending: disjoint slices of one seeded permutation
    of the layer's channels when they fit (E * keep <= F), else an independent random set per expert."""
    kept_ELK = torch.empty(n_experts, n_layers, keep, dtype=torch.long)
    for layer in range(n_layers):
        perm = torch.randperm(ffn, generator=generator)
        for e in range(n_experts):
            if n_experts * keep <= ffn:
                sel = perm[e * keep : (e + 1) * keep]
            else:
                sel = torch.randperm(ffn, generator=generator)[:keep]
            kept_ELK[e, layer] = sel.sort().values
    return kept_ELK


def llama_moe_partition(ffn: int, n_experts: int, n_layers: int, generator: torch.Generator) -> torch.Tensor:
    """[E, L, F // E] LLaMA-MoE's neuron-independent random split: per layer, one seeded permutation of the
    F channels cut into E disjoint experts of F // E channels (ascending within each).

    The MoE format has one expert width, so when E does not divide F the F % E channels at the end of
    each layer's permutation belong to no expert (they are removed, like any pruned channel)."""
    if not 1 <= n_experts <= ffn:
        raise ValueError(
            f"llama-moe split of {ffn} FFN channels into {n_experts} experts: use 1 <= experts <= {ffn}"
        )
    return random_channel_sets(ffn, n_experts, n_layers, ffn // n_experts, generator)


def standardised_scores(scores_LF: torch.Tensor) -> torch.Tensor:
    """[L, F] z = (s - mean over the layer's channels) / std over them (unbiased, as torch.std); a layer
    whose scores are all equal gets z = 0."""
    s = scores_LF.to(torch.float64)
    std = s.std(dim=-1, keepdim=True)
    return (s - s.mean(dim=-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def adaptive_widths(
    scores_LF: torch.Tensor, total: int, floor: int = 1
) -> tuple[list[int], list[torch.Tensor]]:
    """FLAP's adaptive structure search over the FFN channels -> (widths_L, kept_L: [width_l] ascending).

    Every layer's scores are standardised (`standardised_scores`), all layers' z are ranked together and
    the global top `total` channels are kept; each layer's width is what it won. Floor: every layer keeps
    at least its `floor` best channels (default 1; FLAP has no floor, but an expert of width 0 has no
    weights to hold), the remaining total - L * floor go by the global ranking. Ties go to the lower
    layer, then the lower channel.
    """
    n_layers, ffn = scores_LF.shape
    if not 0 <= floor <= ffn or not n_layers * floor <= total <= n_layers * ffn:
        raise ValueError(
            f"adaptive widths: total {total} channels with a floor of {floor} over {n_layers} layers x {ffn} "
            f"channels; choose L * floor <= total <= L * F"
        )
    z_LF = standardised_scores(scores_LF)
    rank_LF = torch.empty_like(z_LF, dtype=torch.long)
    order_LF = torch.sort(z_LF, dim=-1, descending=True, stable=True).indices
    rank_LF.scatter_(1, order_LF, torch.arange(ffn).expand(n_layers, ffn).contiguous())
    keep_LF = rank_LF < floor  # each layer's floor, before the global ranking
    rest = torch.where(keep_LF, torch.full_like(z_LF, -torch.inf), z_LF).flatten()
    won = torch.sort(rest, descending=True, stable=True).indices[: total - n_layers * floor]
    keep_LF.view(-1)[won] = True
    kept_L = [row.nonzero().squeeze(1) for row in keep_LF]
    return [len(k) for k in kept_L], kept_L
