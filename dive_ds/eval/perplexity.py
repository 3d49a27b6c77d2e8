"""Held-out perplexity per domain, for dense, pruned and MoE models.

Legend: N windows, S tokens per window, L layers, K kept channels, H hidden.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
from torch import nn


@torch.no_grad()
def window_nll(model: nn.Module, windows_NS: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) over every window; no padding, no cross-window context."""
    total, count = 0.0, 0
    for i in range(0, windows_NS.shape[0], batch_size):
        ids = windows_NS[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += ids[:, 1:].numel()
    return total, count


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
def pruned_ffn(model: nn.Module, kept_LK: torch.Tensor, means_LF: torch.Tensor | None) -> Iterator[nn.Module]:
    """Temporarily replace every layer's MLP of a dense model by its pruned version (one model in memory)."""
    from dive_ds.stats import compensation_bias

    layers = model.model.layers
    saved = [layer.mlp for layer in layers]
    try:
        for li, layer in enumerate(layers):
            bias = None
            if means_LF is not None:
                bias = compensation_bias(layer.mlp.down_proj.weight, means_LF[li], kept_LK[li])
            layer.mlp = PrunedMLP(saved[li], kept_LK[li], bias)
        yield model
    finally:
        for layer, mlp in zip(layers, saved):
            layer.mlp = mlp


def domain_perplexities(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor],
    batch_size: int = 8,
    oracle: dict[str, int] | None = None,
) -> dict[str, float]:
    """Perplexity per domain; with `oracle` (domain -> expert), every token of a domain goes to that expert."""
    from dive_ds.models.moe import route_all_to

    out = {}
    for name, w in eval_windows.items():
        ctx = route_all_to(model, oracle[name]) if oracle is not None else contextlib.nullcontext()
        with ctx:
            out[name] = perplexity(model, w, batch_size)
    return out


@torch.no_grad()
def routing_report(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor],
    batch_size: int = 8,
    expected: dict[str, int] | None = None,
) -> dict:
    """Normal routing: perplexity per domain plus each domain's expert load (share of routed rows per
    expert, averaged over layers) and, with `expected` (domain -> expert), the share routed there."""
    from dive_ds.models.moe import moe_blocks

    blocks = moe_blocks(model)
    ppl, load, hit = {}, {}, {}
    for name, w in eval_windows.items():
        counts = torch.zeros(len(blocks), blocks[0].num_experts)
        nll, n = 0.0, 0
        for i in range(0, w.shape[0], batch_size):
            a, b = window_nll(model, w[i : i + batch_size], batch_size)
            nll, n = nll + a, n + b
            counts += torch.stack([blk.last_expert_counts.float().cpu() for blk in blocks])
        share = counts / counts.sum(-1, keepdim=True)
        ppl[name] = math.exp(nll / n)
        load[name] = share.mean(0).tolist()
        if expected is not None:
            hit[name] = share[:, expected[name]].mean().item()
    return {"ppl": ppl, "expert_load": load, "routed_to_own_expert": hit}


def timed(fn, *a, **kw):
    t0 = time.time()
    out = fn(*a, **kw)
    return out, time.time() - t0
