"""Unit tests for dive_ds.build.affinity (and the CSV/plot writers of dive_ds.build.mine): exact numbers on small synthetic matrices (CPU, < 1 s each)."""

from fractions import Fraction

import numpy as np
import pytest
import scipy.cluster.hierarchy as sch

from dive_ds.build import affinity as m
from dive_ds.build import fast_affinity as fa
from dive_ds.build import mine

TRUTH_9 = np.repeat([0, 1, 2], 3)  # 9 domains in 3 planted blocks


def planted_perplexity(seed: int = 0) -> np.ndarray:
    """P[i, j] = base_j * (1 same block | 3 otherwise) * (1 + 5% noise), base_j over 10..100."""
    rng = np.random.default_rng(seed)
    base_D = 10 ** rng.uniform(1.0, 2.0, size=9)
    same_DD = TRUTH_9[:, None] == TRUTH_9[None, :]
    noise_DD = 1 + 0.05 * rng.standard_normal((9, 9))
    return base_D[None, :] * np.where(same_DD, 1.0, 3.0) * noise_DD


def planted_scores(seed: int = 0, L: int = 4, F: int = 200) -> np.ndarray:
    """Block-specific heavy-tailed base scores with small per-domain multiplicative noise."""
    rng = np.random.default_rng(seed)
    block_base_BLF = rng.lognormal(0.0, 1.5, size=(3, L, F))
    return block_base_BLF[TRUTH_9] * np.exp(0.2 * rng.standard_normal((9, L, F)))


# ------------------------------------------------------------------------ normalisation


def test_normalise_columns_exact_2x2():
    P = np.array([[2.0, 8.0], [4.0, 2.0]])
    A = m.normalise_columns(P)
    np.testing.assert_array_equal(A, [[1.0, 0.25], [0.5, 1.0]])


def test_normalise_columns_max_is_one_and_scale_free():
    P = planted_perplexity()
    A = m.normalise_columns(P)
    assert (A.max(axis=0) == 1.0).all()
    assert (A > 0).all() and (A <= 1.0).all()
    # Rescaling an evaluation column (an "easier" domain) leaves A unchanged.
    c_D = np.array([1, 10, 0.1, 3, 7, 2, 5, 0.5, 100.0])
    np.testing.assert_allclose(m.normalise_columns(P * c_D[None, :]), A, rtol=1e-14)


@pytest.mark.parametrize(
    "P, match",
    [
        (np.ones((2, 3)), "square"),
        (np.ones(3), "2-D"),
        (np.array([[1.0, np.nan], [1.0, 1.0]]), "non-finite"),
        (np.array([[1.0, 0.0], [1.0, 1.0]]), "positive"),
        (np.array([[1.0, -2.0], [1.0, 1.0]]), "positive"),
    ],
)
def test_normalise_columns_rejects(P, match):
    with pytest.raises(ValueError, match=match):
        m.normalise_columns(P)


# ------------------------------------------------------------------------------ pearson


def test_pearson_similarity_values_and_axis():
    A = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.5], [3.0, 2.0, 1.0]])
    S = m.pearson_similarity(A)
    assert S[0, 2] == pytest.approx(-1.0, abs=1e-15)
    assert S[0, 1] == pytest.approx(np.corrcoef(A)[0, 1], abs=1e-14)
    np.testing.assert_array_equal(np.diag(S), 1.0)
    np.testing.assert_array_equal(S, S.T)
    np.testing.assert_allclose(m.pearson_similarity(A, axis="columns"), np.corrcoef(A.T), atol=1e-14)
    with pytest.raises(ValueError, match="axis"):
        m.pearson_similarity(A, axis="diagonal")


def test_pearson_similarity_constant_row_is_zero_not_nan():
    A = np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [0.7, 0.7, 0.7]])
    S = m.pearson_similarity(A)
    assert np.isfinite(S).all()
    np.testing.assert_array_equal(S[0], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(S[3], [0.0, 0.0, 0.0, 1.0])
    assert S[1, 2] == pytest.approx(-0.5, abs=1e-15)


# --------------------------------------------------------------------------- clustering


def test_planted_perplexity_pipeline_recovers_blocks():
    P = planted_perplexity()
    S = m.pearson_similarity(m.normalise_columns(P))
    labels = m.cluster_domains(S, 3)
    np.testing.assert_array_equal(labels, TRUTH_9)  # canonical labels: exactly the truth
    assert m.adjusted_rand_index(labels, TRUTH_9) == 1.0
    # Shuffling the domains permutes the labels and nothing else.
    perm = np.random.default_rng(1).permutation(9)
    labels_p = m.cluster_domains(S[np.ix_(perm, perm)], 3)
    assert m.adjusted_rand_index(labels_p, TRUTH_9[perm]) == 1.0
    assert labels_p[0] == 0


def test_linkage_matrix_shape_and_methods():
    S = m.pearson_similarity(m.normalise_columns(planted_perplexity()))
    for method in m.LINKAGE_METHODS:
        Z = m.linkage_matrix(S, method)
        assert Z.shape == (8, 4)
        assert Z[-1, 3] == 9  # last merge holds every domain
    with pytest.raises(ValueError, match="ward"):
        m.linkage_matrix(S, "ward")


def test_cluster_domains_ties_give_exactly_n_groups():
    # All pairwise similarities equal: every merge is at the same height and fcluster(maxclust)
    # can only return 1 or D groups; the cut_tree fallback must still give exactly n.
    S = np.full((4, 4), 0.5)
    np.fill_diagonal(S, 1.0)
    assert len(np.unique(sch.fcluster(m.linkage_matrix(S), 2, criterion="maxclust"))) == 1  # the trap
    for n in range(1, 5):
        labels = m.cluster_domains(S, n)
        assert len(np.unique(labels)) == n
        assert labels[0] == 0
        np.testing.assert_array_equal(np.unique(labels), np.arange(n))


def test_cluster_domains_errors():
    S = np.eye(6)
    with pytest.raises(ValueError, match=r"--experts 9 is larger than the 6 domains; use --experts <= 6"):
        m.cluster_domains(S, 9)
    with pytest.raises(ValueError, match=r"n_groups=0"):
        m.cluster_domains(S, 0)
    with pytest.raises(ValueError, match="integer"):
        m.cluster_domains(S, 2.0)
    assert m.cluster_domains(np.eye(1), 1).tolist() == [0]


def test_canonical_labels():
    assert m.canonical_labels([5, 5, 2, 9, 2]).tolist() == [0, 0, 1, 2, 1]
    assert m.canonical_labels(["b", "a", "b"]).tolist() == [0, 1, 0]


# ------------------------------------------------------------------------------- groups

NAMES = ["wiki", "web", "science", "math", "drama", "code"]


def test_groups_round_trip():
    labels = np.array([0, 0, 1, 2, 1, 2])
    groups = m.groups_from_labels(labels, NAMES)
    assert groups == {
        "group_0": ["wiki", "web"],
        "group_1": ["science", "drama"],
        "group_2": ["math", "code"],
    }
    np.testing.assert_array_equal(m.labels_from_groups(groups, NAMES), labels)
    # The label is the group's position in the mapping, not a renumbering.
    swapped = {"g_a": ["math", "code"], "g_b": ["wiki", "web"], "g_c": ["science", "drama"]}
    assert m.labels_from_groups(swapped, NAMES).tolist() == [1, 1, 2, 0, 2, 0]


def test_groups_from_labels_rejects_gaps_and_length():
    with pytest.raises(ValueError, match=r"0\.\.2"):
        m.groups_from_labels([0, 0, 2, 2, 0, 0], NAMES)
    with pytest.raises(ValueError, match="6 domain names"):
        m.groups_from_labels([0, 1], NAMES)


@pytest.mark.parametrize(
    "groups, match",
    [
        (
            {"a": ["wiki", "web", "science"], "b": ["math", "drama", "code", "poetry"]},
            r"unknown domains \['poetry'\] \(known: \['wiki', 'web', 'science', 'math', 'drama', 'code'\]\)",
        ),
        (
            {"a": ["wiki", "web", "science"], "b": ["math", "drama", "code", "web"]},
            r"more than one group.*\['web'\]",
        ),
        (
            {"a": ["wiki", "wiki", "web", "science"], "b": ["math", "drama", "code"]},
            r"listed twice\): \['wiki'\]",
        ),
        ({"a": ["wiki", "web"], "b": ["math", "drama", "code"]}, r"in no group: \['science'\]"),
        ({"a": ["wiki", "web", "science"], "b": ["math", "drama", "code"], "c": []}, "group 'c' is empty"),
        ({"a": "wiki", "b": ["web", "science", "math", "drama", "code"]}, "not the string"),
        ({}, "non-empty"),
    ],
)
def test_labels_from_groups_rejects(groups, match):
    with pytest.raises(ValueError, match=match):
        m.labels_from_groups(groups, NAMES)


def test_labels_from_groups_reports_all_problems_at_once():
    with pytest.raises(ValueError) as e:
        m.labels_from_groups({"a": ["wiki", "poetry"], "b": ["wiki", "math"]}, NAMES)
    msg = str(e.value)
    assert "poetry" in msg and "['wiki']" in msg and "['web', 'science', 'drama', 'code']" in msg


# ---------------------------------------------------------------------------------- ARI


def test_ari_hand_computed():
    # Contingency [[2, 1, 0], [0, 1, 2]]: index = C(2,2)+C(2,2) = 2; rows C(3,2)*2 = 6;
    # columns C(2,2)*3 = 3; C(6,2) = 15; expected = 6*3/15 = 6/5; max = (6+3)/2 = 9/2;
    # ARI = (2 - 6/5) / (9/2 - 6/5) = (4/5) / (33/10) = 8/33.
    expected = Fraction(2 - Fraction(6, 5)) / (Fraction(9, 2) - Fraction(6, 5))
    assert expected == Fraction(8, 33)
    assert m.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == float(expected)
    # Second example: a = [0,0,1,1], b = [0,1,0,1]: index 0, rows 2, cols 2, C(4,2) = 6,
    # expected 2/3, max 2 -> ARI = (0 - 2/3) / (2 - 2/3) = -1/2.
    assert m.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == -0.5


def _ari_pair_counting(x, y) -> Fraction:
    """Independent reference: ARI = 2(ad - bc) / ((a+b)(b+d) + (a+c)(c+d)) over item pairs."""
    a = b = c = d = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            same_x, same_y = x[i] == x[j], y[i] == y[j]
            a += same_x and same_y
            b += same_x and not same_y
            c += same_y and not same_x
            d += not same_x and not same_y
    return Fraction(2 * (a * d - b * c), (a + b) * (b + d) + (a + c) * (c + d))


def test_ari_matches_pair_counting_reference():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(5, 30))
        x, y = rng.integers(0, 4, n).tolist(), rng.integers(0, 5, n).tolist()
        assert m.adjusted_rand_index(x, y) == float(_ari_pair_counting(x, y))


def test_ari_relabelling_invariance_and_symmetry():
    a = [0, 0, 1, 1, 2, 2, 2]
    b = [7, 7, 3, 3, 5, 5, 5]
    assert m.adjusted_rand_index(a, b) == 1.0
    assert m.adjusted_rand_index(a, ["x", "x", "y", "y", "z", "z", "z"]) == 1.0
    c = [0, 1, 1, 1, 2, 2, 0]
    assert m.adjusted_rand_index(a, c) == m.adjusted_rand_index(c, a)
    assert m.adjusted_rand_index(a, c) == m.adjusted_rand_index(b, [9, 4, 4, 4, 8, 8, 9])


def test_ari_edge_cases():
    n = 5
    singletons, one = list(range(n)), [0] * n
    assert m.adjusted_rand_index(singletons, singletons[::-1]) == 1.0
    assert m.adjusted_rand_index(one, [3] * n) == 1.0
    assert m.adjusted_rand_index(singletons, one) == 0.0
    assert m.adjusted_rand_index([1], [2]) == 1.0
    assert m.adjusted_rand_index([], []) == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        m.adjusted_rand_index([0, 1], [0, 1, 2])


def test_family_recovery():
    fam = ["text", "text", "text", "math", "math", "math", "code", "code", "code"]
    assert m.family_recovery(TRUTH_9, fam) == 1.0
    assert m.family_recovery([0] * 9, fam) == 0.0
    with pytest.raises(ValueError, match="8 families for 9 labels"):
        m.family_recovery(TRUTH_9, fam[:8])


# ------------------------------------------------------------------------ fast affinity


def test_kept_sets_counts_and_ties():
    scores = np.array([[[3.0, 1.0, 3.0, 2.0, 3.0]]])  # D=1, L=1, F=5
    kept = fa.kept_sets(scores, 0.4)  # round(2.0) = 2 -> ties at 3.0 go to the lowest indices
    assert kept.dtype == bool
    assert kept[0, 0].tolist() == [True, False, True, False, False]
    assert fa.kept_sets(scores, 0.5)[0, 0].sum() == 2  # round(2.5) = 2 (half to even)
    assert fa.kept_sets(scores, 1.0).all()
    s = planted_scores()
    assert (fa.kept_sets(s, 0.5).sum(axis=-1) == 100).all()
    with pytest.raises(ValueError, match="keeps no channel"):
        fa.kept_sets(scores, 0.05)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fa.kept_sets(scores, 1.5)
    with pytest.raises(ValueError, match=r"\[D, L, F\]"):
        fa.kept_sets(np.ones((2, 3)), 0.5)


def test_jaccard_affinity_exact():
    kept = np.array(
        [
            [[1, 1, 0, 0], [1, 0, 0, 0]],
            [[1, 0, 1, 0], [1, 0, 0, 0]],
            [[0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        dtype=bool,
    )  # D=3, L=2, F=4
    J = fa.jaccard_affinity(kept)
    # Layer 0: |{0,1} ∩ {0,2}| / |{0,1,2}| = 1/3; layer 1: 1/1 -> mean 2/3.
    assert J[0, 1] == pytest.approx(2 / 3, abs=1e-15)
    assert J[0, 2] == 0.0  # empty vs non-empty
    assert J[2, 2] == 1.0  # empty vs empty counts as identical
    np.testing.assert_array_equal(np.diag(J), 1.0)
    with pytest.raises(ValueError, match="boolean"):
        fa.jaccard_affinity(kept.astype(int))


def test_fast_affinities_recover_planted_blocks():
    s = planted_scores()
    J = fa.jaccard_affinity(fa.kept_sets(s, 0.5))
    C = fa.score_correlation_affinity(s)
    for S in (J, C):
        assert m.adjusted_rand_index(m.cluster_domains(S, 3), TRUTH_9) == 1.0
    # Within-block pairs are far more similar than across-block pairs.
    same = (TRUTH_9[:, None] == TRUTH_9[None, :]) & ~np.eye(9, dtype=bool)
    diff = TRUTH_9[:, None] != TRUTH_9[None, :]
    assert J[same].min() > 0.8 > 0.4 > J[diff].max()
    assert C[same].min() > 0.9 > 0.2 > C[diff].max()


def test_fast_affinities_random_control_does_not_recover():
    s = np.random.default_rng(0).lognormal(0.0, 1.5, size=(9, 4, 200))
    ari_j = m.adjusted_rand_index(m.cluster_domains(fa.jaccard_affinity(fa.kept_sets(s, 0.5)), 3), TRUTH_9)
    ari_c = m.adjusted_rand_index(m.cluster_domains(fa.score_correlation_affinity(s), 3), TRUTH_9)
    assert ari_j == pytest.approx(3 / 14, abs=1e-15)  # the actual value for this seed
    assert ari_j < 0.5 and ari_c < 0.5


def test_score_correlation_scale_invariance_and_validation():
    s = planted_scores()
    c_DL1 = np.random.default_rng(3).uniform(0.01, 100.0, size=(9, 4, 1))
    np.testing.assert_allclose(
        fa.score_correlation_affinity(s * c_DL1), fa.score_correlation_affinity(s), atol=1e-12
    )
    s0 = s.copy()
    s0[2, 1] = 0.0  # a dead (domain, layer): constant -> correlation 0 there, still no NaN
    assert np.isfinite(fa.score_correlation_affinity(s0)).all()
    with pytest.raises(ValueError, match=">= 0"):
        fa.score_correlation_affinity(-s)


def test_compare_affinities():
    S = fa.jaccard_affinity(fa.kept_sets(planted_scores(), 0.5))
    same = fa.compare_affinities(S, S, 3)
    assert same["pearson"] == 1.0 and same["spearman"] == 1.0 and same["ari"] == 1.0
    np.testing.assert_array_equal(same["labels_1"], same["labels_2"])
    P_S = m.pearson_similarity(m.normalise_columns(planted_perplexity()))
    cross = fa.compare_affinities(P_S, S, 3)
    assert cross["ari"] == 1.0 and cross["pearson"] > 0.9
    with pytest.raises(ValueError, match="shape"):
        fa.compare_affinities(S, S[:3, :3], 2)


# ------------------------------------------------------------------------ plots and CSV


def test_plot_affinity_writes_png(tmp_path):
    import matplotlib.image as mpimg

    S = m.pearson_similarity(m.normalise_columns(planted_perplexity()))[:6, :6]
    labels = m.cluster_domains(S, 2)
    path = mine.plot_affinity(S, NAMES, labels, tmp_path / "sub" / "affinity.png", "perplexity affinity")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    img = mpimg.imread(path)
    side_px = round(mine.plot_side_inches(6) * 100)
    assert img.shape[:2] == (side_px, side_px) == (600, 600)
    assert img[..., :3].std() > 0.1  # not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == ["affinity.png"]  # no temp file left


def test_matrix_csv_round_trip(tmp_path):
    M = np.array([[1.0, 1 / 3, np.nan], [2.5e-300, -7.0, np.inf]])
    path = mine.write_matrix_csv(tmp_path / "ppl.csv", M, ["pruned,wiki", "pruned_code"], ["a", "b", "c"])
    M2, rows, cols = mine.read_matrix_csv(path)
    np.testing.assert_array_equal(M2, M)  # bit-exact, nan in place
    assert rows == ["pruned,wiki", "pruned_code"] and cols == ["a", "b", "c"]
    with pytest.raises(ValueError, match="does not match"):
        mine.write_matrix_csv(tmp_path / "bad.csv", M, ["x"], ["a", "b", "c"])
    assert not (tmp_path / "bad.csv").exists()
