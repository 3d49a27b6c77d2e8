"""Exact tests of the FLAP statistics and pruning math on known tensors."""

import pytest
import torch

from dive_ds.stats import (
    ChannelStats,
    adaptive_widths,
    channel_scores,
    compensation_bias,
    kept_channels,
    mean_var,
    n_keep,
    standardised_scores,
)


def _stats_from_x(xs):
    """ChannelStats of explicit per-domain inputs xs[d]: [T, F] (one layer), W_down known."""
    s = torch.stack([x.sum(0) for x in xs]).unsqueeze(1)
    q = torch.stack([(x * x).sum(0) for x in xs]).unsqueeze(1)
    n = torch.tensor([float(x.shape[0]) for x in xs], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, 1.0, -0.5, 0.0]], dtype=torch.float64)  # [H=2, F=4]
    h = torch.zeros(len(xs), 1, 2, dtype=torch.float64)
    return ChannelStats(n, s, q, h, (w * w).sum(0, keepdim=True), w.abs().sum(0, keepdim=True)), w


def test_mean_var_matches_torch():
    x = torch.randn(50, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.1, 5.0]) + 3.0
    st, _ = _stats_from_x([x])
    mean, var = mean_var(st.count_D, st.sum_DLF, st.sumsq_DLF)
    torch.testing.assert_close(mean[0, 0], x.mean(0))
    torch.testing.assert_close(var[0, 0], x.var(0, unbiased=True))


def test_scores_exact():
    x = torch.tensor([[0.0, 1.0, 2.0, 1.0], [2.0, 1.0, 0.0, 3.0], [4.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    st, w = _stats_from_x([x])
    var = x.var(0, unbiased=True)  # [4, 0, 1, 1]
    assert var.tolist() == [4.0, 0.0, 1.0, 1.0]
    colsq = torch.tensor([5.0, 5.0, 0.5, 9.0], dtype=torch.float64)
    torch.testing.assert_close(channel_scores(st, "wifv")[0, 0], var * colsq)
    torch.testing.assert_close(channel_scores(st, "ifv")[0, 0], var)
    wifn = (x * x).mean(0).sqrt() * torch.tensor([3.0, 3.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(channel_scores(st, "wifn")[0, 0], wifn)
    with pytest.raises(ValueError, match="unknown score 'l2'"):
        channel_scores(st, "l2")


def test_kept_channels_and_bias():
    scores = torch.tensor([[0.1, 5.0, 3.0, 3.0, 0.2]], dtype=torch.float64)
    assert kept_channels(scores, 3).tolist() == [[1, 2, 3]]
    assert kept_channels(scores, 2).tolist() == [[1, 2]]  # tie 2/3 -> lower index
    w = torch.arange(10, dtype=torch.float64).view(2, 5)  # [H=2, F=5]
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    b = compensation_bias(w, mean, torch.tensor([1, 2, 3]))
    # removed channels 0 and 4: b = W[:,0]*1 + W[:,4]*5
    assert b.tolist() == [0 * 1 + 4 * 5, 5 * 1 + 9 * 5]


def test_n_keep():
    assert n_keep(1536, 0.5) == 768 and n_keep(1536, 0.75) == 384 and n_keep(10, 0.0) == 10
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="prune ratio must be in"):
            n_keep(10, bad)


# --------------------------------------------------------------------------- FLAP adaptive structure search


def test_adaptive_widths_sum_exactly_and_keep_the_top_z():
    scores_LF = torch.rand(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores_LF = scores_LF ** torch.arange(1, 6, dtype=torch.float64).view(5, 1)  # differently skewed layers
    z_LF = standardised_scores(scores_LF)
    torch.testing.assert_close(z_LF.mean(-1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(z_LF.std(-1), torch.ones(5, dtype=torch.float64))
    for total in (5, 37, 100, 199, 200):
        widths, kept = adaptive_widths(scores_LF, total)
        assert sum(widths) == total and min(widths) >= 1
        assert [len(k) for k in kept] == widths
        chosen = torch.zeros(5, 40, dtype=torch.bool)
        for layer, k in enumerate(kept):
            assert torch.equal(
                k, kept_channels(z_LF[layer : layer + 1], widths[layer])[0]
            )  # top z, ascending
            chosen[layer, k] = True
        floors = torch.zeros_like(chosen)
        floors[torch.arange(5), z_LF.argmax(-1)] = True  # each layer's floor channel
        won = chosen & ~floors
        if won.any() and (~chosen).any():
            assert z_LF[won].min() >= z_LF[~chosen].max()  # a global threshold on z


def test_adaptive_widths_favour_the_layer_with_larger_standardised_scores():
    # layer 0: nine equal high scores, three low (z = +0.55 x 9); layer 1 the mirror image (z = +1.65 x 3)
    a = torch.tensor([10.0] * 9 + [0.0] * 3, dtype=torch.float64)
    b = torch.tensor([0.0] * 9 + [10.0] * 3, dtype=torch.float64)
    widths, kept = adaptive_widths(torch.stack([a, b]), 12)
    assert widths == [9, 3]  # a uniform FLAP would give 6 and 6
    assert kept[0].tolist() == list(range(9)) and kept[1].tolist() == [9, 10, 11]
    assert adaptive_widths(torch.stack([a, 1000 * b]), 12)[0] == [
        9,
        3,
    ]  # the scale of a layer's scores is moot


def test_adaptive_widths_floor():
    a = torch.tensor([10.0] * 11 + [0.0], dtype=torch.float64)  # z: +0.29 x 11
    b = torch.tensor([10.0] * 10 + [0.0] * 2, dtype=torch.float64)  # z: +0.41 x 10
    assert adaptive_widths(torch.stack([a, b]), 10, floor=0)[0] == [0, 10]  # FLAP: layer 0 would vanish
    widths, kept = adaptive_widths(torch.stack([a, b]), 10)  # floor 1: its best channel stays
    assert widths == [1, 9] and kept[0].tolist() == [0]
    with pytest.raises(ValueError, match="choose L \\* floor <= total <= L \\* F"):
        adaptive_widths(torch.stack([a, b]), 1)
    with pytest.raises(ValueError, match="choose L \\* floor <= total <= L \\* F"):
        adaptive_widths(torch.stack([a, b]), 25)
