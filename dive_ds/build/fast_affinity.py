"""The fast affinity: domains compared by the channels their statistics keep (Jaccard overlap of kept
sets, or score correlation), from calibration statistics alone, and its agreement with the paper's
pruned-perplexity affinity."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from dive_ds.build.affinity import adjusted_rand_index, as_matrix, cluster_domains, pearson_similarity

# ----------------------------------------------------- fast affinity from statistics


def _as_scores(scores_DLF) -> np.ndarray:
    s = np.asarray(scores_DLF, dtype=np.float64)
    if s.ndim != 3 or 0 in s.shape:
        raise ValueError(f"scores must have shape [D, L, F] with no empty axis, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores have {int((~np.isfinite(s)).sum())} non-finite entries")
    return s


def keep_count(n_channels: int, keep_fraction: float) -> int:
    """Channels kept per layer: round(F * keep_fraction) (Python round, half to even)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
    k = int(round(n_channels * keep_fraction))
    if k < 1:
        raise ValueError(f"keep_fraction={keep_fraction} keeps no channel of {n_channels}; raise it")
    return k


def kept_sets(scores_DLF, keep_fraction: float) -> np.ndarray:
    """Boolean mask [D, L, F] of the top round(F * keep_fraction) channels per (domain, layer).

    Ties are broken deterministically in favour of the lower channel index (stable sort
    of the negated scores).
    """
    s = _as_scores(scores_DLF)
    D, L, F = s.shape
    k = keep_count(F, keep_fraction)
    top_DLk = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    kept_DLF = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(kept_DLF, top_DLk, True, axis=-1)
    return kept_DLF


def jaccard_affinity(kept_DLF) -> np.ndarray:
    """S[a, b] = mean over layers of |K_a ∩ K_b| / |K_a ∪ K_b| of the kept-channel sets.

    A layer where both sets are empty counts as identical (1.0).
    """
    kept = np.asarray(kept_DLF)
    if kept.dtype != bool:
        raise ValueError(f"kept_DLF must be a boolean mask, got dtype {kept.dtype}")
    if kept.ndim != 3 or 0 in kept.shape:
        raise ValueError(f"kept_DLF must have shape [D, L, F], got {kept.shape}")
    K_LDF = np.ascontiguousarray(kept.transpose(1, 0, 2), dtype=np.float64)
    inter_LDD = K_LDF @ K_LDF.transpose(0, 2, 1)  # exact: counts far below 2**53
    size_LD = K_LDF.sum(axis=-1)
    union_LDD = size_LD[:, :, None] + size_LD[:, None, :] - inter_LDD
    jac_LDD = np.divide(inter_LDD, union_LDD, out=np.ones_like(inter_LDD), where=union_LDD > 0)
    return jac_LDD.mean(axis=0)


def score_correlation_affinity(scores_DLF, rel_eps: float = 1e-6) -> np.ndarray:
    """S[a, b] = mean over layers of Pearson corr(log(s_a + eps_a), log(s_b + eps_b)).

    Pearson on log scores rather than Spearman: WIFV scores are non-negative and
    heavy-tailed (variance times a weight norm), so the log makes them roughly symmetric
    and Pearson then behaves much like a rank correlation, while costing one matmul per
    layer instead of a rank transform of D x L x F values, and keeping magnitudes (a
    channel that is 100x more important counts more than one that is 1.1x).
    eps is relative, eps = rel_eps * mean(s) per (domain, layer), so multiplying one
    domain's scores in one layer by any c > 0 only shifts its log vector and leaves the
    affinity unchanged. A (domain, layer) with all scores equal counts as correlation 0
    with the others (see pearson_similarity). Scores must be >= 0.
    """
    s = _as_scores(scores_DLF)
    if (s < 0).any():
        raise ValueError(
            f"scores must be >= 0 for the log transform; min is {s.min()} "
            "(use a non-negative score such as WIFV, IFV or WIFN)"
        )
    if rel_eps <= 0:
        raise ValueError(f"rel_eps={rel_eps} must be > 0")
    mean_DL1 = s.mean(axis=-1, keepdims=True)
    eps_DL1 = np.where(mean_DL1 > 0, rel_eps * mean_DL1, 1.0)
    log_DLF = np.log(s + eps_DL1)
    S = np.mean([pearson_similarity(log_DLF[:, layer, :]) for layer in range(s.shape[1])], axis=0)
    np.fill_diagonal(S, 1.0)
    return S


def _offdiag_corr(x_M: np.ndarray, y_M: np.ndarray) -> float:
    if np.array_equal(x_M, y_M):
        return 1.0
    return float(pearson_similarity(np.stack([x_M, y_M]))[0, 1])


def compare_affinities(S1_DD, S2_DD, n_groups: int, method: str = "average") -> dict:
    """Agreement of two similarity matrices over the same domains.

    Returns {"pearson": Pearson correlation of the upper-triangle off-diagonal entries,
    "spearman": the same on their ranks, "ari": ARI of cluster_domains(S1, n_groups) vs
    cluster_domains(S2, n_groups), "labels_1": int64 [D], "labels_2": int64 [D]}.
    Correlations are 1.0 when the off-diagonal entries are identical and 0.0 when exactly
    one side is constant (or D < 3 with different entries), never NaN.
    """
    S1 = as_matrix(S1_DD, "first similarity matrix")
    S2 = as_matrix(S2_DD, "second similarity matrix")
    if S1.shape != S2.shape:
        raise ValueError(f"similarity matrices differ in shape: {S1.shape} vs {S2.shape}")
    iu = np.triu_indices(S1.shape[0], k=1)
    x_M, y_M = S1[iu], S2[iu]
    if len(x_M):
        pearson = _offdiag_corr(x_M, y_M)
        spearman = _offdiag_corr(rankdata(x_M), rankdata(y_M))
    else:
        pearson = spearman = 1.0
    labels_1 = cluster_domains(S1, n_groups, method)
    labels_2 = cluster_domains(S2, n_groups, method)
    return {
        "pearson": pearson,
        "spearman": spearman,
        "ari": adjusted_rand_index(labels_1, labels_2),
        "labels_1": labels_1,
        "labels_2": labels_2,
    }
