"""Paired bootstrap intervals and token-weighted perplexity: exact hand computations on tiny cases."""

import math

import numpy as np
import pytest

from dive_ds.eval.paired import (
    cluster_resamples,
    paired_ratio,
    pooled_interval,
    ratio_interval,
    resample_indices,
    summarise,
)


def test_ratio_interval_equals_hand_computation():
    nll_a = np.array([10.0, 20.0, 30.0])
    nll_b = np.array([12.0, 18.0, 36.0])
    tokens = np.array([5.0, 5.0, 10.0])
    idx = np.array([[0, 1, 2], [0, 0, 0], [2, 2, 1], [1, 1, 1]])
    res = ratio_interval(nll_a, nll_b, tokens, idx, level=0.5)
    # whole set: (60 - 66) / 20 = -0.3
    assert res["ratio"] == pytest.approx(math.exp(-0.3))
    # diffs a - b: [-2, 2, -6]; resamples: [-6/20, -6/15, (-6-6+2)/25, 6/15] -> sorted exps; 25% / 75% quantiles (linear)
    boots = sorted(math.exp(x) for x in (-6 / 20, -6 / 15, -10 / 25, 6 / 15))
    lo = boots[0] + 0.75 * (boots[1] - boots[0])
    hi = boots[2] + 0.25 * (boots[3] - boots[2])
    assert res["lo"] == pytest.approx(lo) and res["hi"] == pytest.approx(hi)


def test_resamples_stay_within_their_domain():
    idx = resample_indices([3, 2], n_boot=500, seed=1)
    assert idx.shape == (500, 5)
    assert set(idx[:, :3].ravel()) == {0, 1, 2} and set(idx[:, 3:].ravel()) == {3, 4}
    assert np.array_equal(idx, resample_indices([3, 2], 500, seed=1))


def test_identical_models_give_ratio_one_and_a_zero_width_interval():
    a = {"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0]}
    res = paired_ratio(a, a, {"x": 7, "y": 3}, n_boot=100)
    assert res["ratio"] == 1.0 and res["lo"] == res["hi"] == 1.0


def test_a_consistent_gap_excludes_one_and_noise_does_not():
    rng = np.random.default_rng(0)
    base = {"x": list(rng.normal(500, 50, 32)), "y": list(rng.normal(300, 30, 32))}
    better = {d: [v - 10 for v in vals] for d, vals in base.items()}  # 10 nats less on every window
    res = paired_ratio(better, base, {"x": 255, "y": 255})
    assert res["hi"] < 1.0 and res["ratio"] == pytest.approx(math.exp(-10 / 255))
    noisy = {d: [v + rng.normal(0, 20) for v in vals] for d, vals in base.items()}
    res = paired_ratio(noisy, base, {"x": 255, "y": 255})
    assert res["lo"] < 1.0 < res["hi"]


def test_paired_refuses_other_windows():
    with pytest.raises(ValueError, match="same domains and windows"):
        paired_ratio({"x": [1.0]}, {"x": [1.0, 2.0]}, {"x": 3})


def test_token_weighted_headline_and_mean():
    s = summarise({"x": [2.0, 4.0], "y": [30.0]}, {"x": 2, "y": 10})
    assert s["ppl"]["x"] == pytest.approx(math.exp(6 / 4)) and s["ppl"]["y"] == pytest.approx(math.exp(3.0))
    assert s["ppl_tokens"] == pytest.approx(math.exp(36 / 14))
    assert s["ppl_mean"] == pytest.approx((math.exp(1.5) + math.exp(3.0)) / 2)


def test_cluster_bootstrap_draws_whole_documents():
    idx = cluster_resamples([[0, 0, 1], [5, 6]], n_boot=200, seed=3)
    for i in idx:
        first = sorted(x for x in i if x < 3)
        assert len(first) % 1 == 0 and all(
            (0 in first) == (1 in first) for _ in [0]
        )  # windows 0, 1 travel together
        assert first.count(0) == first.count(1)
        assert set(i) <= {0, 1, 2, 3, 4} and sum(x >= 3 for x in i) == 2  # two clusters of one window each
    # one big cluster: the paired ratio cannot move; windows resampled alone would
    a, b = {"x": [1.0, 5.0, 9.0]}, {"x": [2.0, 2.0, 2.0]}
    one = paired_ratio(a, b, {"x": 1}, n_boot=100, clusters={"x": [7, 7, 7]})
    assert one["lo"] == one["hi"] == pytest.approx(one["ratio"]) and one["bootstrap"] == "cluster"
    free = paired_ratio(a, b, {"x": 1}, n_boot=100)
    assert free["lo"] < free["ratio"] < free["hi"]


def test_pooled_interval_takes_the_seeds_spread():
    tight_a, tight_b = np.full(1000, 0.9), np.full(1000, 1.1)  # two seeds, each certain of itself
    lo, hi = pooled_interval([tight_a, tight_b], seed=0)
    assert lo == pytest.approx(0.9) and hi == pytest.approx(1.1)
