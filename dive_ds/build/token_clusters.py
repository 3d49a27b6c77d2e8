"""Token clusters of one layer's MLP inputs (issue 25, design 2): k-means over every rank's tokens, with no
token leaving its rank, and the FLAP statistics of each cluster.

Experts cut from token clusters need no domain labels and each layer gets its own grouping: at layer l the
calibration tokens' MLP inputs are clustered into C clusters; the down_proj inputs of each cluster give its
channel statistics, and `reconstruct --groups-from clusters` cuts expert c of layer l from cluster c's.

Deterministic for a seed, whatever the number of ranks: the C initial centroids are k-means++ seeds drawn in
the global token order (one scalar per token gathered per seed; the drawn token's owner supplies its row),
and every Lloyd step sums float64 centroid sums and counts over the ranks.

Legend: T tokens (of this rank), H hidden, C clusters, F FFN width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK = 8192
"""Token rows per distance computation."""


def initial_centroids(
    x_TH: torch.Tensor,
    global_ids_T: torch.Tensor,
    total: int,
    clusters: int,
    seed: int,
    reduce: Callable,
    gather: Callable,
) -> torch.Tensor:
    """[C, H] float64 k-means++ seeds over every rank's tokens: the first a token drawn by the seed, each next
    one a token drawn with probability proportional to its squared distance to the nearest seed so far. The
    draw walks the tokens in their global order (a scalar per token is gathered), so the seeds are the same
    whatever the number of ranks; the drawn token's owner supplies its row (a sum over ranks)."""
    if clusters > total:
        raise ValueError(
            f"--token-clusters {clusters} is more than the {total} calibration tokens; use fewer"
        )
    g = torch.Generator().manual_seed(seed)
    c_CH = torch.zeros(clusters, x_TH.shape[1], dtype=torch.float64, device=x_TH.device)

    def take(k: int, gid: int) -> None:
        row = torch.zeros(x_TH.shape[1], dtype=torch.float64, device=x_TH.device)
        here = (global_ids_T == gid).nonzero()
        if here.numel():
            row = x_TH[here[0, 0]].to(torch.float64)
        c_CH[k] = reduce(row)

    chosen = [int(torch.randint(total, (1,), generator=g))]
    take(0, chosen[0])
    d2_T = torch.full((x_TH.shape[0],), float("inf"), dtype=torch.float64, device=x_TH.device)
    for k in range(1, clusters):
        last = c_CH[k - 1].to(x_TH.dtype)  # a token's row: exact in the rows' own dtype
        for i in range(0, x_TH.shape[0], CHUNK):
            diff = x_TH[i : i + CHUNK] - last  # squares summed in float64, no float64 copy of the rows
            d2_T[i : i + CHUNK] = torch.minimum(
                d2_T[i : i + CHUNK], (diff * diff).sum(-1, dtype=torch.float64)
            )
        rows = gather(torch.stack([global_ids_T.to(torch.float64), d2_T], dim=1))  # [total, 2], rank order
        order = rows[:, 0].argsort()
        ids, d2 = rows[order, 0].long(), rows[order, 1]
        cum = d2.cumsum(0)
        if cum[-1].item() <= 0:  # every token sits on a seed already: the lowest id not taken yet
            gid = next(int(i) for i in ids.tolist() if int(i) not in chosen)
        else:
            u = torch.rand(1, generator=g, dtype=torch.float64).item() * cum[-1].item()
            at = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64))), len(ids) - 1)
            gid = int(ids[at])
        chosen.append(gid)
        take(k, gid)
    return c_CH


def assign(x_TH: torch.Tensor, c_CH: torch.Tensor) -> torch.Tensor:
    """[T] the nearest centroid of every row (squared Euclidean distance; ties -> the lower index)."""
    c = c_CH.to(torch.float32)
    c_sq = (c * c).sum(-1)
    out = torch.empty(x_TH.shape[0], dtype=torch.long, device=x_TH.device)
    for i in range(0, x_TH.shape[0], CHUNK):
        x = x_TH[i : i + CHUNK].to(torch.float32)
        out[i : i + CHUNK] = (c_sq.unsqueeze(0) - 2 * x @ c.T).argmin(-1)  # |x|^2 is the same for every c
    return out


def kmeans(
    x_TH: torch.Tensor,
    global_ids_T: torch.Tensor,
    total: int,
    clusters: int,
    iters: int,
    seed: int,
    reduce: Callable = lambda t: t,
    gather: Callable = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from k-means++ seeds over every rank's rows -> (centroids [C, H] float64, labels [T] of
    this rank's rows).

    `reduce` sums a tensor over the ranks, `gather` concatenates their rows (both the identity on one rank).
    Stops after `iters` steps or when no label changes on any rank; a cluster left empty keeps its centroid."""
    c_CH = initial_centroids(x_TH, global_ids_T, total, clusters, seed, reduce, gather)
    labels = assign(x_TH, c_CH)
    for _ in range(iters):
        sums_CH = torch.zeros_like(c_CH)
        for i in range(0, x_TH.shape[0], CHUNK):  # float64 a chunk at a time (no float64 copy of all rows)
            sums_CH.index_add_(0, labels[i : i + CHUNK], x_TH[i : i + CHUNK].to(torch.float64))
        counts_C = torch.zeros(clusters, dtype=torch.float64, device=x_TH.device).index_add_(
            0, labels, torch.ones_like(labels, dtype=torch.float64)
        )
        sums_CH, counts_C = reduce(sums_CH), reduce(counts_C)
        filled = counts_C > 0
        c_CH = torch.where(filled.unsqueeze(1), sums_CH / counts_C.clamp_min(1).unsqueeze(1), c_CH)
        new = assign(x_TH, c_CH)
        changed = reduce(
            torch.tensor([float((new != labels).sum())], dtype=torch.float64, device=x_TH.device)
        )
        labels = new
        if changed.item() == 0:
            break
    return c_CH, labels


def cluster_sums(
    labels_T: torch.Tensor, x_TH: torch.Tensor, h_TF: torch.Tensor, clusters: int
) -> dict[str, torch.Tensor]:
    """These rows' sums per cluster -> float64 token count [C], MLP-input sum [C, H], down_proj-input sum and
    sum of squares [C, F]. Summed in float32 (a one-hot [C, T] matmul), as the domain statistics sum each
    batch; the pass calls this once per batch of windows and adds the results in float64, so the sums do
    not depend on how the batches are shared out over ranks."""
    dev = h_TF.device
    one_CT = torch.zeros(clusters, labels_T.shape[0], dtype=torch.float32, device=dev)
    one_CT[labels_T, torch.arange(labels_T.shape[0], device=dev)] = 1.0
    h = h_TF.to(torch.float32)
    return {
        "count": torch.bincount(labels_T, minlength=clusters).to(torch.float64),
        "mlp_in": (one_CT @ x_TH.to(device=dev, dtype=torch.float32)).to(torch.float64),
        "sum": (one_CT @ h).to(torch.float64),
        "sumsq": (one_CT @ (h * h)).to(torch.float64),
    }
