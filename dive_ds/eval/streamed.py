"""Perplexity layer by layer, like the calibration pass: one decoder layer resident, the windows' hidden
states carried from layer to layer (on the GPU when they fit beside the layer, else on the host), the
windows shared out over ranks. No process ever holds the whole
model, so a 70B MoE is evaluated with one layer's weights per rank.

Several variants of the model run in one pass over its weights: each carries its own hidden states
through the same resident layer. A variant is the model as it is (router routing, expert load counted),
the model routed by domain (oracle: every token of a domain to that domain's expert), or the model with
each layer's MLP replaced (mining's pruned FFNs: all D pruned variants of a layer are evaluated while
that layer is resident, so the dense model is read once, not D times).

The sums equal the whole-model evaluation (dive_ds/eval/perplexity.py) up to float rounding: per-token NLL
from float32 logits, summed in float64 per domain, all-reduced over ranks.

Legend: V variants, D domains, W windows, S tokens per window, H hidden, L layers, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dive_ds.eval.perplexity import rank_windows
from dive_ds.parallel.ranks import Ranks


@dataclass
class Variant:
    """One model evaluated in the stream."""

    name: str
    mlp: Callable[[int, nn.Module], nn.Module] | None = None
    """(layer index, the resident layer's MLP) -> the MLP this variant uses there (None: the layer's own)."""
    expert_of_domain: Sequence[int] | None = None
    """Oracle routing (a MoE): domain index -> the expert every token of that domain goes to."""
    count_experts: bool = False
    """Count the rows each expert receives, per domain and layer (a MoE's router routing)."""


@dataclass
class StreamedSums:
    """Float64 sums over every rank's windows: NLL per variant and domain, tokens per domain, and for the
    variants that count them the rows per expert (None for the others)."""

    nll_VD: torch.Tensor
    tokens_D: torch.Tensor
    counts_VDLE: list[torch.Tensor | None]
    seconds: float

    def ppl(self, v: int) -> torch.Tensor:
        return (self.nll_VD[v] / self.tokens_D).exp()


def _carry_device(dev: torch.device, nbytes: int) -> torch.device:
    """Where the carried hidden states live: on the GPU when they take under half its free memory (the rest
    is for the resident layer and its working set), else offloaded to the host."""
    if dev.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(dev)
    return dev if nbytes < 0.5 * free else torch.device("cpu")


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The families' RMSNorm: normalised in float32, cast back to the input dtype, then scaled."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


@torch.no_grad()
def streamed_nll(
    model: str | Path,
    windows: dict[str, torch.Tensor],
    variants: Sequence[Variant],
    ranks: Ranks | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "evaluate",
) -> StreamedSums:
    """Every variant's summed NLL on every domain's windows, reading `model` (a dense or dive_moe folder, HF
    or sharded) one decoder layer at a time. On many ranks each carries its share of the windows."""
    from tqdm import tqdm

    from dive_ds.io.layers import ModelLayers

    ranks = ranks or Ranks()
    dev = ranks.device
    layers = model if isinstance(model, ModelLayers) else ModelLayers(model)
    if any(v.count_experts or v.expert_of_domain is not None for v in variants) and not layers.is_moe:
        raise ValueError(
            f"{layers.folder} is a dense model: router and oracle routing need a dive_moe folder"
        )
    config = layers.config
    n_layers, hidden = config.num_hidden_layers, config.hidden_size
    names = list(windows)
    mine = rank_windows(windows, ranks)
    batches, at = [], 0  # (domain, first row, end) in this rank's buffer; a batch stays in one domain
    for d, w in enumerate(mine.values()):
        batches += [
            (d, at + i, at + min(i + batch_size, w.shape[0])) for i in range(0, w.shape[0], batch_size)
        ]
        at += w.shape[0]
    ids = torch.cat(list(mine.values())) if at else torch.zeros(0, 1, dtype=torch.long)
    # a variant that neither routes by domain nor counts rows per domain runs batches across domains
    # (mining's pruned models: fewer, larger matmuls, about 10% faster on the CPU); the NLL is still summed
    # per domain at the end
    spans = [(None, i, min(i + batch_size, at)) for i in range(0, at, batch_size)]
    seq_len = next(iter(windows.values())).shape[1]
    counts = [
        torch.zeros(len(names), n_layers, config.num_local_experts, dtype=torch.float64)
        if v.count_experts
        else None
        for v in variants
    ]

    t0 = time.time()
    embed = layers.get("model.embed_tokens.weight").to(dev, dtype)
    first = F.embedding(ids.to(dev), embed)
    del embed
    carry = _carry_device(dev, len(variants) * first.numel() * first.element_size())
    hid = [first.to(carry, copy=True) for _ in variants]  # the carried states, in the compute dtype
    del first
    pos = torch.arange(seq_len, device=dev).unsqueeze(0)
    pe = layers.rotary(dev)(torch.zeros(1, seq_len, hidden, dtype=dtype, device=dev), pos)
    bar = tqdm(total=n_layers * len(variants) * ids.numel() * ranks.world, unit="tok", unit_scale=True,
               disable=not (progress and ranks.is_main), desc=desc, dynamic_ncols=True)  # fmt: skip
    for li in range(n_layers):
        layer = layers.layer(li, dtype, dev)
        own = layer.mlp
        for v, variant in enumerate(variants):
            layer.mlp = variant.mlp(li, own) if variant.mlp is not None else own
            per_domain = variant.expert_of_domain is not None or counts[v] is not None
            for d, a, b in batches if per_domain else spans:
                if variant.expert_of_domain is not None:
                    layer.mlp.forced_expert = int(variant.expert_of_domain[d])
                out = layer(
                    hid[v][a:b].to(dev), attention_mask=None, position_ids=pos, position_embeddings=pe
                )
                hid[v][a:b] = (out[0] if isinstance(out, tuple) else out).to(carry)
                if counts[v] is not None:
                    counts[v][d, li] += layer.mlp.last_expert_counts.cpu().double()
                bar.update((b - a) * seq_len * ranks.world)
            if variant.expert_of_domain is not None:
                layer.mlp.forced_expert = None
            layer.mlp = own
        layer.to("meta")  # decoder layers hold reference cycles: free the weights now, not at the next gc
        del layer, own
    bar.close()

    norm_w = layers.get("model.norm.weight").to(dev, dtype)
    out_w = layers.output_weight().to(dev, dtype)
    eps = float(config.rms_norm_eps)
    sums = torch.zeros(len(variants) + 1, len(names), dtype=torch.float64)  # NLL per variant, then tokens
    for v in range(len(variants)):
        for d, a, b in batches:
            x = _rms_norm(hid[v][a:b].to(dev), norm_w, eps)
            logits = F.linear(x, out_w)[:, :-1].float()
            tgt = ids[a:b, 1:].to(dev)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            sums[v, d] += nll.double().sum().item()
            if v == 0:
                sums[-1, d] += tgt.numel()
    del hid
    ranks.sum_(sums)
    for c in counts:
        if c is not None:
            ranks.sum_(c)
    return StreamedSums(sums[:-1], sums[-1], counts, time.time() - t0)


def streamed_report(
    model: str | Path,
    windows: dict[str, torch.Tensor],
    router: bool = True,
    oracle: dict[str, int] | None = None,
    expected: dict[str, int] | None = None,
    ranks: Ranks | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """evaluate's perplexity results, streamed: {"router": ppl per domain, "expert_load", "routed_to_own_expert"}
    (a MoE with `router`; for a dense model "router" is its plain perplexity) and {"oracle": ppl per domain}
    (a MoE with `oracle`, domain -> expert), in one pass over the weights; with `expected` (domain -> expert)
    the share of each domain's rows the router sent there."""
    from dive_ds.io.layers import ModelLayers

    layers = model if isinstance(model, ModelLayers) else ModelLayers(model)
    names = list(windows)
    variants = []
    if router or not layers.is_moe:
        variants.append(Variant("router", count_experts=layers.is_moe))
    if oracle is not None and layers.is_moe:
        variants.append(Variant("oracle", expert_of_domain=[oracle[n] for n in names]))
    if not variants:  # nothing asked (no router, no oracle map): no pass over the weights
        return {}
    sums = streamed_nll(layers, windows, variants, ranks, dtype, batch_size, progress)
    res: dict = {}
    for v, variant in enumerate(variants):
        res[variant.name] = dict(zip(names, sums.ppl(v).tolist()))
        if variant.count_experts:
            share_DLE = sums.counts_VDLE[v] / sums.counts_VDLE[v].sum(-1, keepdim=True)
            res["expert_load"] = dict(zip(names, share_DLE.mean(1).tolist()))
            res["routed_to_own_expert"] = (
                {n: share_DLE[d, :, expected[n]].mean().item() for d, n in enumerate(names)}
                if expected
                else {}
            )
    return res
