"""Per-window NLL, token-weighted perplexity and paired bootstrap intervals of perplexity ratios.

A comparison scores every model on the SAME windows, so a difference between two models is judged
by resampling windows (with replacement, within each domain: the domain mix stays fixed) and
recomputing both models' perplexities on each resample: the paired bootstrap. The headline is
token-weighted, exp(total NLL / total tokens) over every evaluated token, so no single
high-perplexity domain dominates it; the mean of per-domain perplexities is kept beside it.

Legend: W windows (all domains, concatenated in domain order), B bootstrap resamples.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch


@torch.no_grad()
def per_window_nll(
    model, windows_NS: torch.Tensor, batch_size: int = 8, route_to: int | None = None
) -> list[float]:
    """Summed next-token NLL of every window (float64 sums of float32 token NLLs); a window of S tokens
    predicts S - 1. `route_to`: every token of a MoE to that expert (oracle routing)."""
    from dive_ds.eval.perplexity import token_nll
    from dive_ds.models.moe import route_all_to

    device = next(model.parameters()).device
    ctx = route_all_to(model, route_to) if route_to is not None else contextlib.nullcontext()
    out: list[float] = []
    with ctx:
        for i in range(0, windows_NS.shape[0], batch_size):
            out += token_nll(model, windows_NS[i : i + batch_size].to(device)).double().sum(1).tolist()
    return out


def summarise(nll: dict[str, list[float]], tokens_per_window: dict[str, int]) -> dict:
    """{ppl: per domain, ppl_tokens: token-weighted headline, ppl_mean: mean of per-domain ppl}."""
    ppl = {d: math.exp(sum(v) / (len(v) * tokens_per_window[d])) for d, v in nll.items()}
    total = sum(sum(v) for v in nll.values())
    count = sum(len(v) * tokens_per_window[d] for d, v in nll.items())
    return {"ppl": ppl, "ppl_tokens": math.exp(total / count), "ppl_mean": float(np.mean(list(ppl.values())))}


def resample_indices(domain_sizes: list[int], n_boot: int, seed: int) -> np.ndarray:
    """[B, W] window indices: each resample draws every domain's windows with replacement from that
    domain's own windows (stratified), in domain order."""
    rng = np.random.default_rng(seed)
    parts, start = [], 0
    for n in domain_sizes:
        parts.append(start + rng.integers(0, n, size=(n_boot, n)))
        start += n
    return np.concatenate(parts, axis=1)


def cluster_resamples(domain_clusters: list[list[int]], n_boot: int, seed: int) -> list[np.ndarray]:
    """B index arrays: per domain, its clusters (windows of one document) are drawn with replacement and
    every window of a drawn cluster comes along (a cluster bootstrap, stratified by domain): windows of one
    document are not independent evidence."""
    rng = np.random.default_rng(seed)
    members, start = [], 0
    for clusters in domain_clusters:
        by: dict[int, list[int]] = {}
        for i, c in enumerate(clusters):
            by.setdefault(c, []).append(start + i)
        members.append([np.array(v) for v in by.values()])
        start += len(clusters)
    out = []
    for _ in range(n_boot):
        picks = [m[j] for m in members for j in rng.integers(0, len(m), size=len(m))]
        out.append(np.concatenate(picks))
    return out


def ratio_interval(
    nll_a_W: np.ndarray, nll_b_W: np.ndarray, tokens_W: np.ndarray, idx_BW, level: float = 0.95
) -> dict:
    """Token-weighted perplexity ratio ppl(a) / ppl(b) = exp((sum nll_a - sum nll_b) / sum tokens), and its
    percentile interval over the resamples `idx_BW` (index arrays, the same windows for both: paired).
    The bootstrap ratios are returned as `boot` (for pooling over seeds; not for the JSON)."""
    diff_W = np.asarray(nll_a_W, dtype=np.float64) - np.asarray(nll_b_W, dtype=np.float64)
    tokens_W = np.asarray(tokens_W, dtype=np.float64)
    ratio = math.exp(diff_W.sum() / tokens_W.sum())
    boot_B = np.array([math.exp(diff_W[i].sum() / tokens_W[i].sum()) for i in idx_BW])
    lo, hi = np.quantile(boot_B, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"ratio": ratio, "lo": float(lo), "hi": float(hi), "boot": boot_B}


def paired_ratio(
    a: dict[str, list[float]],
    b: dict[str, list[float]],
    tokens_per_window: dict[str, int],
    n_boot: int = 2000,
    seed: int = 0,
    clusters: dict[str, list[int]] | None = None,
) -> dict:
    """ratio_interval of two models' per-window NLLs on the same domains and windows (refused otherwise);
    with `clusters` (per domain, a cluster id per window) a cluster bootstrap, else windows are resampled."""
    if list(a) != list(b) or any(len(a[d]) != len(b[d]) for d in a):
        raise ValueError("a paired ratio needs both models scored on the same domains and windows")
    domains = list(a)
    nll_a = np.concatenate([a[d] for d in domains])
    nll_b = np.concatenate([b[d] for d in domains])
    tokens = np.concatenate([[tokens_per_window[d]] * len(a[d]) for d in domains])
    if clusters is not None:
        idx = cluster_resamples([clusters[d] for d in domains], n_boot, seed)
    else:
        idx = resample_indices([len(a[d]) for d in domains], n_boot, seed)
    return ratio_interval(nll_a, nll_b, tokens, idx) | {
        "windows": int(len(nll_a)),
        "resamples": n_boot,
        "bootstrap": "cluster" if clusters is not None else "window",
    }


def pooled_interval(boots: list[np.ndarray], seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A hierarchical interval over several pairs (seeds): each resample takes one pair at random and that
    pair's bootstrap ratio, so the spread between seeds enters the interval with the spread over windows."""
    rng = np.random.default_rng(seed)
    b = np.stack(boots)  # [P, B]
    pick = b[rng.integers(0, b.shape[0], size=b.shape[1]), np.arange(b.shape[1])]
    lo, hi = np.quantile(pick, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (z) Wilson score interval of a proportion p observed on n items; stays inside [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
