"""Exact tests of the FLAP statistics and pruning math on known tensors."""

import pytest
import torch

from dive_ds.stats import ChannelStats, channel_scores, compensation_bias, kept_channels, mean_var, n_keep


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
