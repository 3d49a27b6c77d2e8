"""The router fit over tokens sharded across ranks (dive_ds/build/router_math.py, the *_sharded functions):
two shards, run as two threads whose `reduce` and `gather` exchange through a barrier (the same sums and
gathers torch.distributed would do), against the one-process fit on all tokens."""

import threading

import pytest
import torch

from dive_ds.build.router_math import (
    excess_error,
    fit_linear_router,
    fit_linear_router_sharded,
    label_accuracy,
    noise_weight_init,
    noise_weight_init_sharded,
    routing_sums,
    soft_temperature,
    soft_temperature_sharded,
)


class Shards:
    """`reduce` / `gather` for n threads, each one rank."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def reduce(self, rank: int):
        def fn(t):
            got = self.exchange(rank, t)
            t.copy_(sum(got[1:], got[0].clone()))
            return t

        return fn

    def gather(self, rank: int):
        return lambda t: torch.cat(self.exchange(rank, t))


def run_sharded(fn, parts):
    """fn(rank, part, shards) on every part in its own thread -> the results in rank order."""
    shards, out, errors = Shards(len(parts)), [None] * len(parts), []

    def work(r):
        try:
            out[r] = fn(r, parts[r], shards)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            shards.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def problem(seed=0, t=900, h=24, e=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g) * torch.linspace(0.2, 3.0, h)
    w_true = torch.randn(e, h, generator=g)
    err = 0.5 * torch.rand(t, e, generator=g, dtype=torch.float64) + 1 - (x @ w_true.T).softmax(-1).double()
    return x, err


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_two_shards_fit_the_same_router_as_one_process(target):
    x, err = problem()
    tau = soft_temperature(err)
    tgt = (
        err.argmin(-1)
        if target == "hard"
        else torch.softmax(-(err - err.min(-1, keepdim=True).values) / tau, -1).float()
    )
    whole = fit_linear_router(x, tgt, 4, 1e-4, 200, 1e-4, block=100)
    cut = [slice(0, 500), slice(500, None)]  # unequal shards of whole blocks (as ranks hold whole windows)
    got = run_sharded(
        lambda r, s, sh: fit_linear_router_sharded(x[s], tgt[s], 4, sh.reduce(r), 1e-4, 200, 1e-4, 100), cut
    )
    assert torch.equal(got[0], got[1])  # every rank ran the very same L-BFGS
    # the same float32 sums per block, added in float64 in another order: rounding only
    torch.testing.assert_close(got[0], whole, rtol=1e-4, atol=1e-5)
    assert label_accuracy(x, got[0], err) == pytest.approx(label_accuracy(x, whole, err), abs=1 / 900)


def test_sharded_medians_and_sums_equal_the_whole_token_ones():
    x, err = problem(seed=1)
    w = fit_linear_router(x, err.argmin(-1), 4, 1e-4, 50, 1e-3)
    cut = [slice(0, 301), slice(301, 650), slice(650, None)]
    taus = run_sharded(lambda r, s, sh: soft_temperature_sharded(err[s], sh.gather(r)), cut)
    assert taus == [soft_temperature(err)] * 3  # a median of the same gathered values: exact
    nws = run_sharded(
        lambda r, s, sh: noise_weight_init_sharded(x[s], w, 0.5, sh.reduce(r), sh.gather(r)), cut
    )
    torch.testing.assert_close(nws[0], noise_weight_init(x, w, 0.5), rtol=1e-5, atol=1e-7)
    sums = run_sharded(lambda r, s, sh: sh.reduce(r)(routing_sums(x[s], w, err[s])), cut)
    tok, hit, chosen, best, *share = sums[0].tolist()
    assert tok == 900 and hit / tok == pytest.approx(label_accuracy(x, w, err), rel=1e-6)
    assert chosen / best == pytest.approx(excess_error(x, w, err), rel=1e-6)
    assert share == torch.bincount(err.argmin(-1), minlength=4).double().tolist()


@pytest.mark.parametrize("target", ["hard", "soft"])
def test_blocked_loss_sums_equal_the_reference_and_do_not_depend_on_the_split(target):
    """router_loss_sums == router_loss_grad's mean loss and gradient times T (no penalty); summed by blocks, the
    sums of two shards cut at a block boundary add up to the whole one's up to float64 rounding (the fit on
    one rank and on many then follows the same L-BFGS path)."""
    from dive_ds.build.router_math import router_loss_grad, router_loss_sums

    x, err = problem(seed=2)  # 900 rows
    w = torch.randn(4, x.shape[1], generator=torch.Generator().manual_seed(9)) * 0.3
    tgt = err.argmin(-1) if target == "hard" else torch.softmax(-err * 3, -1).float()
    loss, grad = router_loss_sums(x, tgt, w, block=100)
    ref_loss, ref_grad = router_loss_grad(x, tgt, w, 0.0)
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss.float(), ref_loss * 900, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad * 900, rtol=1e-5, atol=1e-4)
    halves = [router_loss_sums(x[s], tgt[s], w, block=100) for s in (slice(0, 300), slice(300, None))]
    assert abs((halves[0][0] + halves[1][0]).item() - loss.item()) <= 1e-12 * abs(loss.item())
    torch.testing.assert_close(halves[0][1] + halves[1][1], grad, rtol=1e-13, atol=1e-13)
