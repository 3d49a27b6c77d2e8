"""Held-out perplexity per domain, for dense, pruned and MoE models, on one rank or many.

On many ranks (a `Ranks` from dive_ds.parallel.ranks) every domain's windows are shared out
(`rank_windows`), each rank sums its NLL and token counts in float64 and the sums are all-reduced:
perplexity = exp(total NLL / total tokens), the same as one rank's up to float rounding. Logits are
taken in float32 whatever the model's dtype.

Legend: N windows, S tokens per window, L layers, K kept channels, H hidden, D domains, E experts.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from dive_ds.parallel.ranks import Ranks


@torch.no_grad()
def window_nll(model: nn.Module, windows_NS: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) over every window; no padding, no cross-window context.

    The windows go to the model's device; per-token NLL in float32, summed in float64 (so the total
    does not depend on how the windows are batched or shared out over ranks, beyond float32 logits)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows_NS.shape[0], batch_size):
        ids = windows_NS[i : i + batch_size].to(device)
        total += token_nll(model, ids).double().sum().item()
        count += ids[:, 1:].numel()
    return total, count


def token_nll(model: nn.Module, ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S-1] float32 next-token NLL of a batch of windows already on the model's device."""
    logits = model(input_ids=ids_BS, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids_BS[:, 1:].reshape(-1), reduction="none"
    )
    return nll.view(ids_BS.shape[0], -1)


def rank_windows(eval_windows: dict[str, torch.Tensor], ranks: Ranks | None) -> dict[str, torch.Tensor]:
    """This rank's windows of every domain: all (domain, window) pairs, in order, shared out by `Ranks.share`
    (a domain may give a rank none; every rank gets some when `ranks.check_items(total)` passed)."""
    if ranks is None or not ranks.distributed:
        return eval_windows
    mine = torch.tensor(ranks.share(sum(w.shape[0] for w in eval_windows.values())), dtype=torch.long)
    out, start = {}, 0
    for name, w in eval_windows.items():
        sel = mine[(mine >= start) & (mine < start + w.shape[0])] - start
        out[name] = w[sel]
        start += w.shape[0]
    return out


def domain_nll(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor],
    batch_size: int = 8,
    oracle: dict[str, int] | None = None,
    ranks: Ranks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll_D, tokens_D) float64, summed over every rank's share of each domain's windows (all-reduced)."""
    from dive_ds.models.moe import route_all_to

    mine = rank_windows(eval_windows, ranks)
    sums_2D = torch.zeros(2, len(eval_windows), dtype=torch.float64)
    for d, (name, w) in enumerate(mine.items()):
        ctx = route_all_to(model, oracle[name]) if oracle is not None else contextlib.nullcontext()
        with ctx:
            sums_2D[0, d], sums_2D[1, d] = window_nll(model, w, batch_size)
    if ranks is not None:
        ranks.sum_(sums_2D)
    return sums_2D[0], sums_2D[1]


def perplexity(model: nn.Module, windows_NS: torch.Tensor, batch_size: int = 8) -> float:
    nll, n = window_nll(model, windows_NS, batch_size)
    return math.exp(nll / n)


class PrunedMLP(nn.Module):
    """A gated MLP restricted to kept channels, with the FLAP compensation bias on its output."""

    def __init__(self, dense_mlp: nn.Module, kept_K: torch.Tensor, bias_H: torch.Tensor | None):
        super().__init__()
        self.gate = dense_mlp.gate_proj.weight[kept_K]
        self.up = dense_mlp.up_proj.weight[kept_K]
        self.down = dense_mlp.down_proj.weight[:, kept_K].contiguous()
        self.bias = None if bias_H is None else bias_H.to(self.down.dtype)
        self.act = dense_mlp.act_fn

    def forward(self, x):
        y = nn.functional.linear(
            self.act(nn.functional.linear(x, self.gate)) * nn.functional.linear(x, self.up), self.down
        )
        return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def pruned_ffn(
    model: nn.Module, kept_LK: torch.Tensor | Sequence[torch.Tensor], means_LF: torch.Tensor | None
) -> Iterator[nn.Module]:
    """Temporarily replace every layer's MLP of a dense model by its pruned version (one model in memory).

    `kept_LK`: each layer's kept channels, [L, K] or a list of [K_l] (per-layer widths, e.g. flap-adaptive)."""
    from dive_ds.stats import compensation_bias

    layers = model.model.layers
    saved = [layer.mlp for layer in layers]
    try:
        for li, layer in enumerate(layers):
            w_down = layer.mlp.down_proj.weight
            kept = kept_LK[li].to(w_down.device)  # the model may sit on a GPU, the statistics on the host
            bias = None
            if means_LF is not None:
                bias = compensation_bias(w_down, means_LF[li].to(w_down.device), kept)
            layer.mlp = PrunedMLP(saved[li], kept, bias)
        yield model
    finally:
        for layer, mlp in zip(layers, saved):
            layer.mlp = mlp


def domain_perplexities(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor],
    batch_size: int = 8,
    oracle: dict[str, int] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Perplexity per domain; with `oracle` (domain -> expert), every token of a domain goes to that expert.
    With `ranks`, each rank evaluates its share of the windows and the sums are all-reduced."""
    nll_D, n_D = domain_nll(model, eval_windows, batch_size, oracle, ranks)
    return {name: math.exp(nll_D[d].item() / n_D[d].item()) for d, name in enumerate(eval_windows)}


@torch.no_grad()
def routing_report(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor],
    batch_size: int = 8,
    expected: dict[str, int] | None = None,
    ranks: Ranks | None = None,
) -> dict:
    """Normal routing: perplexity per domain plus each domain's expert load (share of routed rows per
    expert, averaged over layers) and, with `expected` (domain -> expert), the share routed there.
    With `ranks`, NLL, token and expert-load counts are summed over every rank's share of the windows."""
    from dive_ds.models.moe import moe_blocks

    blocks = moe_blocks(model)
    mine = rank_windows(eval_windows, ranks)
    n_dom = len(eval_windows)
    sums_2D = torch.zeros(2, n_dom, dtype=torch.float64)
    counts_DLE = torch.zeros(n_dom, len(blocks), blocks[0].num_experts, dtype=torch.float64)
    for d, w in enumerate(mine.values()):
        for i in range(0, w.shape[0], batch_size):
            a, b = window_nll(model, w[i : i + batch_size], batch_size)
            sums_2D[0, d] += a
            sums_2D[1, d] += b
            counts_DLE[d] += torch.stack([blk.last_expert_counts.cpu() for blk in blocks]).double()
    if ranks is not None:
        ranks.sum_(sums_2D)
        ranks.sum_(counts_DLE)
    ppl, load, hit = {}, {}, {}
    for d, name in enumerate(eval_windows):
        share_LE = counts_DLE[d] / counts_DLE[d].sum(-1, keepdim=True)
        ppl[name] = math.exp(sums_2D[0, d].item() / sums_2D[1, d].item())
        load[name] = share_LE.mean(0).tolist()
        if expected is not None:
            hit[name] = share_LE[:, expected[name]].mean().item()
    return {"ppl": ppl, "expert_load": load, "routed_to_own_expert": hit}


def timed(fn, *a, **kw):
    t0 = time.time()
    out = fn(*a, **kw)
    return out, time.time() - t0
