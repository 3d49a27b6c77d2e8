"""Domain affinity mining: affinity matrices and clustering, as pure functions on arrays.

Two ways to a D x D domain similarity, both ending in the same clustering:

- perplexity-based (the paper): a D x D perplexity matrix of domain-pruned models on
  every domain's held-out text -> column normalisation -> Pearson similarity;
- fast, from calibration statistics alone (no pruned evaluations): overlap of the
  per-domain kept-channel sets (Jaccard), or correlation of the per-domain channel
  scores, averaged over layers.

`compare_affinities` checks one against the other.

Shape legend (suffixes on array names):
    D  domains (calibration / evaluation domains)
    L  decoder layers
    F  FFN channels per layer (intermediate size)
    M  entries of a condensed distance vector, D * (D - 1) / 2
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.cluster.hierarchy as sch
from scipy.spatial.distance import squareform

# Linkage methods that are valid on an arbitrary (non-Euclidean) distance such as 1 - r.
# ward / centroid / median assume Euclidean distances and are refused.
LINKAGE_METHODS = ("average", "complete", "single", "weighted")


# --------------------------------------------------------------------------- validation


def as_matrix(M, name: str, *, square: bool = True) -> np.ndarray:
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {M.shape}")
    if square and M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be square (D x D), got shape {M.shape}")
    if M.size == 0:
        raise ValueError(f"{name} is empty (shape {M.shape}); it needs at least one domain")
    bad = np.argwhere(~np.isfinite(M))
    if len(bad):
        where = ", ".join(str(tuple(int(i) for i in b)) for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{name} has {len(bad)} non-finite entries at {where}{more}")
    return M


def check_names(names: Sequence[str], what: str = "domain_names") -> list[str]:
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of names, not the single string {names!r}")
    names = [str(n) for n in names]
    dup = sorted(n for n, count in Counter(names).items() if count > 1)
    if dup:
        raise ValueError(f"{what} contains duplicates: {dup}")
    return names


# ------------------------------------------------------------------- perplexity affinity


def normalise_columns(ppl_DD) -> np.ndarray:
    """Column-normalise a perplexity matrix: A[i, j] = min_k P[k, j] / P[i, j].

    Rows i are domain-pruned models, columns j are evaluation domains. The normalisation
    removes the scale difference between evaluation sets: every column's best model gets
    exactly 1.0 and the others a value in (0, 1].

    Raises ValueError if the matrix is not square, has non-finite or non-positive entries.
    """
    P_DD = as_matrix(ppl_DD, "perplexity matrix")
    bad = np.argwhere(P_DD <= 0)
    if len(bad):
        where = ", ".join(str(tuple(int(i) for i in b)) for b in bad[:5])
        raise ValueError(f"perplexity matrix must be positive; {len(bad)} entries <= 0 at {where}")
    return P_DD.min(axis=0, keepdims=True) / P_DD


def pearson_similarity(A_DD, axis: str = "rows") -> np.ndarray:
    """Pearson correlation between the rows (axis="rows") or columns ("columns") of A.

    Returns a symmetric matrix S with S[i, i] = 1 and entries in [-1, 1]. A row (column)
    of zero variance has no defined correlation; here it is defined as 0 with every other
    row and 1 with itself, so the result never contains NaN. "Zero variance" means
    exactly constant (max == min), not numerically small. A need not be square.
    """
    A = as_matrix(A_DD, "affinity matrix", square=False)
    if axis in ("rows", "row", 0):
        X = A
    elif axis in ("columns", "cols", "column", 1):
        X = A.T
    else:
        raise ValueError(f"axis={axis!r}; use axis='rows' or axis='columns'")
    C = X - X.mean(axis=1, keepdims=True)
    const = np.ptp(X, axis=1) == 0
    C[const] = 0.0
    # Rescaling a row does not change its correlations; doing it first avoids overflow.
    scale = np.abs(C).max(axis=1)
    const |= scale == 0
    C[~const] /= scale[~const, None]
    norm = np.sqrt((C * C).sum(axis=1))
    U = np.zeros_like(C)
    U[~const] = C[~const] / norm[~const, None]
    S = np.clip(U @ U.T, -1.0, 1.0)
    S = 0.5 * (S + S.T)
    np.fill_diagonal(S, 1.0)
    return S


# ------------------------------------------------------------------------- clustering


def _distance_condensed(S_DD: np.ndarray) -> np.ndarray:
    S = 0.5 * (S_DD + S_DD.T)
    dist_DD = np.clip(1.0 - S, 0.0, None)
    np.fill_diagonal(dist_DD, 0.0)
    return squareform(dist_DD, checks=False)  # dist_M


def linkage_matrix(S_DD, method: str = "average") -> np.ndarray:
    """Agglomerative linkage (scipy format, shape [D - 1, 4]) on the distance 1 - S.

    S is symmetrised, the distance clipped at 0 and its diagonal set to 0. `method` is one
    of LINKAGE_METHODS (those valid for a non-Euclidean distance). Needs D >= 2.
    """
    S = as_matrix(S_DD, "similarity matrix")
    if method not in LINKAGE_METHODS:
        raise ValueError(
            f"linkage method {method!r} is not supported on 1 - correlation distances; "
            f"use one of {list(LINKAGE_METHODS)}"
        )
    if S.shape[0] < 2:
        raise ValueError(f"a linkage needs at least 2 domains, got {S.shape[0]}")
    return sch.linkage(_distance_condensed(S), method=method)


def canonical_labels(labels_D) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance (int64 array)."""
    labels = np.asarray(labels_D)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def cluster_domains(S_DD, n_groups: int, method: str = "average") -> np.ndarray:
    """Cluster domains into exactly `n_groups` groups by agglomerative clustering on 1 - S.

    Cut with fcluster(maxclust); if ties in merge heights make it return fewer groups,
    cut the tree after D - n_groups merges instead (cut_tree), which always yields exactly
    n_groups. Labels are 0 .. n_groups-1 in order of first appearance (canonical and
    deterministic). Returns an int64 array of shape [D].
    """
    S = as_matrix(S_DD, "similarity matrix")
    D = S.shape[0]
    if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)):
        raise ValueError(f"n_groups must be an integer, got {n_groups!r}")
    n_groups = int(n_groups)
    if n_groups < 1:
        raise ValueError(f"n_groups={n_groups} (--experts {n_groups}) must be >= 1")
    if n_groups > D:
        raise ValueError(
            f"--experts {n_groups} is larger than the {D} domains; use --experts <= {D} or pass --groups FILE"
        )
    if D == 1:
        return np.zeros(1, dtype=np.int64)
    Z = linkage_matrix(S, method)
    labels = sch.fcluster(Z, t=n_groups, criterion="maxclust")
    if len(np.unique(labels)) != n_groups:
        labels = sch.cut_tree(Z, n_clusters=n_groups).reshape(-1)
    labels = canonical_labels(labels)
    assert labels.max() + 1 == n_groups
    return labels


# ------------------------------------------------------------------------------ groups


def groups_from_labels(labels_D, domain_names: Sequence[str]) -> dict[str, list[str]]:
    """{"group_0": [names...], "group_1": ...}: group k holds the domains labelled k.

    Labels must be integers 0 .. G-1 with every value present; names keep the order of
    `domain_names` within a group.
    """
    names = check_names(domain_names)
    labels = np.asarray(labels_D)
    if labels.ndim != 1 or len(labels) != len(names):
        raise ValueError(f"labels have shape {labels.shape} but there are {len(names)} domain names")
    if len(labels) == 0:
        return {}
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    G = int(labels.max()) + 1
    missing = sorted(set(range(G)) - set(labels.tolist()))
    if labels.min() < 0 or missing:
        raise ValueError(
            f"labels must cover 0..{G - 1} exactly; got values {sorted(set(labels.tolist()))} "
            "(renumber them with canonical_labels)"
        )
    return {f"group_{k}": [n for n, lab in zip(names, labels) if lab == k] for k in range(G)}


def labels_from_groups(groups: Mapping[str, Sequence[str]], domain_names: Sequence[str]) -> np.ndarray:
    """Inverse of groups_from_labels: label[d] = position of d's group in `groups` order.

    Validates that every domain is in exactly one group. All problems found (empty
    groups, unknown names, domains listed twice, domains in no group) are reported in one
    ValueError. Returns an int64 array of shape [D]; the label is the group's index in the
    mapping's order (expert k = k-th group), not renumbered.
    """
    names = check_names(domain_names)
    if not isinstance(groups, Mapping) or len(groups) == 0:
        raise ValueError(f"groups must be a non-empty mapping of group name -> domain names, got {groups!r}")
    index = {n: i for i, n in enumerate(names)}
    labels = np.full(len(names), -1, dtype=np.int64)
    problems: list[str] = []
    unknown: list[str] = []
    dup: list[str] = []
    for k, (gname, members) in enumerate(groups.items()):
        if isinstance(members, str):
            problems.append(f"group {gname!r} must be a list of domain names, not the string {members!r}")
            continue
        members = list(members)
        if not members:
            problems.append(f"group {gname!r} is empty")
        for m in members:
            if m not in index:
                unknown.append(str(m))
            elif labels[index[m]] >= 0:
                dup.append(m)
            else:
                labels[index[m]] = k
    if unknown:
        problems.append(f"unknown domains {sorted(set(unknown))} (known: {names})")
    if dup:
        problems.append(f"domains in more than one group (or listed twice): {sorted(set(dup))}")
    missing = [n for n, lab in zip(names, labels) if lab < 0 and n not in dup]
    if missing:
        problems.append(f"domains in no group: {missing}")
    if problems:
        raise ValueError("invalid groups: " + "; ".join(problems))
    return labels


# ------------------------------------------------------------------ partition agreement


def adjusted_rand_index(labels_a, labels_b) -> float:
    """Adjusted Rand index (Hubert & Arabie, 1985) of two partitions of the same items.

    Computed from the contingency table in exact integer arithmetic with one final
    division. Labels may be any comparable values (ints, strings). 1.0 for identical
    partitions up to relabelling, about 0 for independent ones, can be negative.
    Degenerate cases where the index is 0/0 (n <= 1; both partitions all singletons; both
    a single cluster) are exactly the cases of identical partitions and return 1.0.
    """
    a, b = np.asarray(labels_a).reshape(-1), np.asarray(labels_b).reshape(-1)
    if len(a) != len(b):
        raise ValueError(f"partitions have different lengths: {len(a)} and {len(b)}")
    n = len(a)
    if n <= 1:
        return 1.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ia, ib = ia.reshape(-1).astype(np.int64), ib.reshape(-1).astype(np.int64)
    # Non-zero cells of the contingency table only (it would be n x n for singletons).
    _, cells = np.unique(ia * (ib.max() + 1) + ib, return_counts=True)

    def comb2(x) -> int:
        return sum(int(v) * (int(v) - 1) // 2 for v in np.asarray(x).reshape(-1))

    index = comb2(cells)
    sum_a = comb2(np.bincount(ia))
    sum_b = comb2(np.bincount(ib))
    total = n * (n - 1) // 2
    # ARI = (index - sa*sb/total) / ((sa+sb)/2 - sa*sb/total), multiplied through by 2*total.
    num = 2 * (index * total - sum_a * sum_b)
    den = (sum_a + sum_b) * total - 2 * sum_a * sum_b
    if den == 0:
        return 1.0
    return num / den


def family_recovery(labels_D, families: Sequence[str]) -> float:
    """ARI of a grouping against the domains' source families (one string per domain)."""
    labels = np.asarray(labels_D).reshape(-1)
    families = [str(f) for f in families]
    if len(families) != len(labels):
        raise ValueError(f"{len(families)} families for {len(labels)} labels")
    return adjusted_rand_index(labels, np.asarray(families, dtype=str))
