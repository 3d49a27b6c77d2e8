"""The router fit's pure math: reconstruction-error labels and targets, the regression, its report
metrics, and the sliced experts' errors (no I/O, no model loading; dive_ds.build.router_pass streams the
layers and calls these).

Legend: T tokens, H hidden, E experts, F FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_errors(y_dense_TH: torch.Tensor, y_experts_ETH: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error of each expert's output against the dense FFN's -> err_TE."""
    return ((y_experts_ETH - y_dense_TH.unsqueeze(0)) ** 2).sum(-1).transpose(0, 1)


def soft_targets(err_TE: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(-err / tau) over experts: the closer an expert's output, the larger its share."""
    return torch.softmax(-(err_TE - err_TE.min(-1, keepdim=True).values) / tau, dim=-1)


def soft_temperature(err_TE: torch.Tensor) -> float:
    """Median gap between the best and second-best expert's error (>0): the scale of a meaningful difference."""
    if err_TE.shape[1] < 2:
        return 1.0
    two = torch.topk(err_TE, 2, dim=-1, largest=False).values
    gap = (two[:, 1] - two[:, 0]).median().item()
    return gap if gap > 0 else 1.0


def router_loss_grad(
    xs_TH: torch.Tensor, target: torch.Tensor, w_EH: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router fit's objective and its gradient in closed form (no autograd):
    mean cross-entropy of softmax(xs @ w.T) against `target` (labels [T] or distributions [T, E])
    + 0.5 * l2 * |w|^2 -> (loss, dloss/dw [E, H]). The reference the fit's blocked sums (router_loss_sums)
    are tested against."""
    t = xs_TH.shape[0]
    logits = xs_TH @ w_EH.T
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    if target.dtype == torch.long:
        loss = (lse - logits.gather(1, target[:, None])[:, 0]).mean()
        p[torch.arange(t, device=p.device), target] -= 1
    else:
        loss = (lse - (logits * target).sum(-1)).mean()
        p -= target
    grad = p.T @ xs_TH / t + l2 * w_EH
    return loss + 0.5 * l2 * (w_EH * w_EH).sum(), grad


BLOCK = 256
"""Rows per float32 partial sum in the fit (router_pass passes the calibration window length)."""

WHITEN_RIDGE = 1e-3
"""Ridge added to the feature covariance before it is whitened, as a share of its mean diagonal."""


def whitener(gram_HH: torch.Tensor, n: float) -> torch.Tensor:
    """A [H, H] float32 with A^T C A = I for C = gram / n + ridge: the fit runs on weights w' with w = w' A^T,
    in which coordinates the features are uncorrelated and of unit variance, so L-BFGS converges in a
    fraction of the iterations (the objective, penalty included, is the same function of w)."""
    c = gram_HH.to(torch.float64) / max(n, 1.0)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    low = torch.linalg.cholesky(c + WHITEN_RIDGE * (c.diagonal().mean().item() or 1.0) * eye)  # C = L L^T
    return torch.linalg.solve_triangular(low, eye, upper=False).T.to(torch.float32).contiguous()  # A = L^-T


def lbfgs_to_tolerance(w_EH: torch.Tensor, closure, grad_max, max_iter: int, tolerance: float) -> None:
    """Minimise with L-BFGS over the whitened weights `w_EH` (a leaf; `closure` sets its .grad) until the
    largest entry of the gradient in the weights' own coordinates is at most `tolerance`, or `max_iter`
    iterations (and 5/4 of that in evaluations) in all. `grad_max()` -> (that entry, the whitened gradient's
    largest entry) at the current weights. L-BFGS itself stops on the whitened gradient: when that stop leaves
    the own gradient above `tolerance`, it goes on from where it was (its history kept) with the whitened
    tolerance scaled by how far the own gradient is off (usually once)."""
    max_eval = max_iter * 5 // 4
    opt = torch.optim.LBFGS([w_EH], lr=1.0, max_iter=max_iter, max_eval=max_eval, history_size=20,
                            tolerance_grad=tolerance, tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip
    opt.step(closure)
    state, group = opt.state[w_EH], opt.param_groups[0]
    for _ in range(20):
        done, evals = state.get("n_iter", 0), state.get("func_evals", 0)
        own, whitened = grad_max()
        if own <= tolerance or done >= max_iter or evals >= max_eval or not math.isfinite(own):
            return
        group["tolerance_grad"] = 0.9 * whitened * tolerance / own
        group["max_iter"], group["max_eval"] = max_iter - done, max_eval - evals
        opt.step(closure)
        # no step taken (a flat or exhausted line search): as good as it gets
        if state.get("n_iter", 0) == done:
            return


def fit_linear_router(
    x_TH: torch.Tensor,
    target: torch.Tensor,
    num_experts: int,
    l2: float = 1e-4,
    max_iter: int = 200,
    tolerance: float = 1e-9,
    block: int = BLOCK,
    cov_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multinomial logistic regression without bias: logits = x @ W.T -> W [E, H] (float32).

    `target` is a LongTensor [T] of labels or a float [T, E] of target distributions. Features are
    scaled by their root mean square, floored at a tenth of the median one (the penalty acts on the
    scaled problem, so no weight blows up on a near-silent feature), the weights start at zero and
    L-BFGS (on whitened weights, `whitener`, with the covariance of the blocks `cov_blocks` marks) is
    deterministic, so the fit is a pure function of its inputs. It stops after `max_iter` iterations or once
    every entry of the scaled problem's gradient is below `tolerance`. The one-process case of
    fit_linear_router_sharded (the same code, nothing to all-reduce): with `block` the calibration window
    length, one rank and many sum the same float32 block sums (where a row's float32 results do not depend on
    the batch's shape, as on the CPU tests here), so they differ by float64 rounding, amplified only as far as
    L-BFGS amplifies it."""
    return fit_linear_router_sharded(
        x_TH, target, num_experts, lambda t: t, l2, max_iter, tolerance, block, cov_blocks
    )


def _project64(x_TH: torch.Tensor, u_H: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """x @ u in float64, a few thousand rows at a time (no float64 copy of all of x)."""
    return torch.cat([x_TH[i : i + rows].to(torch.float64) @ u_H for i in range(0, x_TH.shape[0], rows)])


def noise_weight_init(x_TH: torch.Tensor, w_EH: torch.Tensor, ratio: float) -> torch.Tensor:
    """noise_weight [E, H] whose softplus(x . nw) is about `ratio` x the median top-1 - top-2 margin.

    Each row points along the mean input direction u, scaled so the typical token's x . nw hits the
    softplus inverse of the target std; zero rows (std log 2) when that is undefined.
    """
    num_experts = w_EH.shape[0]
    if num_experts < 2 or ratio <= 0:
        return torch.zeros_like(w_EH)
    logits = x_TH.to(torch.float32) @ w_EH.T
    two = torch.topk(logits, 2, dim=-1).values
    target_std = ratio * (two[:, 0] - two[:, 1]).median().item()
    u_H = x_TH.mean(0, dtype=torch.float64)
    if u_H.norm() == 0 or target_std <= 0:
        return torch.zeros_like(w_EH)
    u_H = u_H / u_H.norm()
    m = _project64(x_TH, u_H).median().item()
    if abs(m) < 1e-6:
        return torch.zeros_like(w_EH)
    pre = math.log(math.expm1(target_std)) if target_std < 30 else target_std  # softplus^-1
    return (u_H * (pre / m)).to(w_EH.dtype).expand(num_experts, -1).contiguous()


def label_accuracy(x_TH: torch.Tensor, w_EH: torch.Tensor, err_TE: torch.Tensor) -> float:
    """Share of tokens whose top-1 expert under the router is the arg-min error expert."""
    if x_TH.shape[0] == 0:
        return float("nan")
    return (x_TH.to(torch.float32) @ w_EH.T).argmax(-1).eq(err_TE.argmin(-1)).float().mean().item()


def excess_error(x_TH: torch.Tensor, w_EH: torch.Tensor, err_TE: torch.Tensor) -> float:
    """Mean error of the router's top-1 expert over the mean error of the best one (1 = optimal)."""
    if x_TH.shape[0] == 0:
        return float("nan")
    chosen = (x_TH.to(torch.float32) @ w_EH.T).argmax(-1)
    return (err_TE.gather(1, chosen[:, None]).mean() / err_TE.min(-1).values.mean().clamp_min(1e-30)).item()


def sliced_channels(experts, w_gate_FH, w_up_FH, w_down_HF) -> list[torch.Tensor] | None:
    """Each expert's channels in the dense FFN when every expert is an exact slice of it (as reconstruction
    makes them: gate/up rows and down columns copied), else None (e.g. after LoRA was merged)."""
    width = experts.down_proj.shape[-1]
    row_of = {w_gate_FH[j].numpy().tobytes(): j for j in range(w_gate_FH.shape[0])}
    kept = []
    for e in range(experts.num_experts):
        gu = experts.gate_up_proj[e].to(w_gate_FH.dtype)
        idx = [row_of.get(gu[i].numpy().tobytes()) for i in range(width)]
        if any(i is None for i in idx):
            return None
        k = torch.tensor(idx)
        if not (
            torch.equal(gu[width:], w_up_FH[k])
            and torch.equal(experts.down_proj[e].to(w_down_HF.dtype), w_down_HF[:, k])
        ):
            return None
        kept.append(k)
    return kept


def removed_channels(kept: list[torch.Tensor], ffn: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The dense FFN's channels that the sliced experts removed -> (common, own): `common` the ones no expert
    keeps, `own[e]` the others expert e removed (sorted indices). R_e = common + own[e]."""
    kept_by_EF = torch.zeros(len(kept), ffn, dtype=torch.bool)
    for e, k in enumerate(kept):
        kept_by_EF[e, k] = True
    kept_by_any_F = kept_by_EF.any(0)
    common = torch.nonzero(~kept_by_any_F).flatten()
    own = [torch.nonzero(~row & kept_by_any_F).flatten() for row in kept_by_EF]
    return common, own


def removed_down_columns(w_down_HF: torch.Tensor, removed) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """W_down's columns of removed_channels' (common, own) -> (W[:, common], [W[:, own_e]]): gathered once a
    layer for sliced_errors."""
    common, own = removed
    return w_down_HF.index_select(1, common), [w_down_HF.index_select(1, r) for r in own]


def sliced_errors(
    h_TF: torch.Tensor,
    w_down_HF: torch.Tensor,
    removed: tuple[torch.Tensor, list[torch.Tensor]],
    bias_EH,
    down_removed: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """err_TE of sliced experts from the dense FFN's intermediate h alone: y_e - y = b_e - W_down[:, R_e] h[R_e],
    R_e the channels expert e removed, given as removed_channels' (common, own) on h's device (and, optional,
    removed_down_columns' of them, else gathered here). The common channels' down-projection runs once; then
    one gather and one matmul per expert over its own ones: under E/2 dense down-projections in all at
    r = 0.5, as large matmuls. (Blocks of channels shared by subsets of experts cost fewer multiply-adds but,
    at six experts, 64 small blocks and a T x H sum per block and expert: twice the time on the demo;
    docs/speed.md.)"""
    common, own = removed
    w_common, w_own = down_removed if down_removed is not None else removed_down_columns(w_down_HF, removed)
    base = -F.linear(h_TF.index_select(1, common), w_common)
    out = torch.empty(h_TF.shape[0], len(own), dtype=h_TF.dtype, device=h_TF.device)
    for e, rem in enumerate(own):
        start = base if bias_EH is None else base + bias_EH[e]
        diff = torch.addmm(start, h_TF.index_select(1, rem), w_own[e].T, alpha=-1)
        out[:, e] = (diff * diff).sum(-1)
    return out


# --------------------------------------------------------------------------- the fit over sharded tokens
# Each rank holds only its own tokens' rows. `reduce(t)` sums a tensor over ranks in place (and returns it);
# `gather(t)` concatenates every rank's rows of a per-token tensor. Sums travel in float64; the only rows
# gathered are one scalar per token (for the medians), so memory per rank is O(own tokens).


def _blocked_sum(a_TX: torch.Tensor, b_TY: torch.Tensor, block: int) -> torch.Tensor:
    """sum over t of a[t]^T b[t] -> [X, Y] float64: each block of `block` consecutive rows in float32 (one
    batched matmul), the blocks added in float64. Rows shared out over ranks in whole blocks give the same
    block sums on any number of ranks, so their all-reduced total differs only by float64 rounding."""
    t, n = a_TX.shape[0], (a_TX.shape[0] // block) * block
    out = torch.zeros(a_TX.shape[1], b_TY.shape[1], dtype=torch.float64, device=a_TX.device)
    for i in range(0, n, 16 * block):  # 16 blocks per batched matmul: [16, X, Y] float32 at a time
        k = min(n, i + 16 * block)
        a = a_TX[i:k].reshape(-1, block, a_TX.shape[1]).transpose(1, 2)
        for part in torch.bmm(a, b_TY[i:k].reshape(-1, block, b_TY.shape[1])):
            out.add_(part)  # float32 into float64, a block at a time (a float64 sum over dim 0 is 10x slower)
    if n < t:
        out += (a_TX[n:].T @ b_TY[n:]).to(torch.float64)
    return out


def router_loss_sums(x_TH: torch.Tensor, target: torch.Tensor, w_EH: torch.Tensor, block: int = BLOCK):
    """Sum over these tokens of the cross-entropy of softmax(x @ w.T) against `target` and its gradient (no
    penalty) -> (loss sum, grad sum [E, H]), float64, summed a block of rows at a time (`_blocked_sum`);
    zero for no tokens."""
    logits = x_TH @ w_EH.T
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    if target.dtype == torch.long:
        nll = lse - logits.gather(1, target[:, None])[:, 0]
        p[torch.arange(x_TH.shape[0], device=p.device), target] -= 1
    else:
        nll = lse - (logits * target).sum(-1)
        p -= target
    n = (nll.shape[0] // block) * block
    loss = nll[:n].view(-1, block).sum(1).to(torch.float64).sum() + nll[n:].sum().to(torch.float64)
    return loss, _blocked_sum(p, x_TH, block)


SUM_CHUNK = 65536
"""Rows per float64 chunk when a token-sized sum is taken (no float64 copy of all rows at once)."""


def fit_linear_router_sharded(
    x_TH: torch.Tensor,
    target: torch.Tensor,
    num_experts: int,
    reduce,
    l2: float = 1e-4,
    max_iter: int = 200,
    tolerance: float = 1e-9,
    block: int = BLOCK,
    cov_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """fit_linear_router on tokens sharded over ranks (this rank's rows in x_TH and target): the feature
    scales and covariance, the mean loss and its gradient are all-reduced float64 sums, so every rank runs the
    same L-BFGS and gets the same W [E, H] without any rank holding another's rows. Each rank's rows are
    whole blocks of `block` rows (the calibration windows), so the sums equal one rank's up to float64 rounding.

    No token-sized copy is made: the squares are summed in chunks, and the feature scales are folded into the
    weights (x / s @ w.T == x @ (w / s).T; the gradient in w is the one in w / s, divided by s)."""
    x = x_TH if x_TH.dtype == torch.float32 else x_TH.to(torch.float32)
    n = reduce(torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)).item()
    sq_H = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], SUM_CHUNK):
        sq_H += x[i : i + SUM_CHUNK].to(torch.float64).pow(2).sum(0)
    rms_H = (reduce(sq_H) / n).sqrt().to(torch.float32)
    scale_H = rms_H.clamp_min(0.1 * rms_H.median().item() + 1e-12)
    a_HH = _whitening(x, scale_H, num_experts, n, reduce, block, cov_blocks)
    wp = torch.zeros(num_experts, x.shape[1], dtype=torch.float32, device=x.device, requires_grad=True)

    def loss_grad():
        w = wp.detach() @ a_HH.T  # the scaled problem's weights
        loss, grad = router_loss_sums(x, target, w / scale_H, block)
        both = reduce(torch.cat([loss.reshape(1), grad.reshape(-1)]))
        g = (both[1:].view_as(w) / n).to(torch.float32) / scale_H + l2 * w
        return (both[0] / n).to(torch.float32) + 0.5 * l2 * (w * w).sum(), g

    def closure():
        loss, g = loss_grad()
        wp.grad = g @ a_HH
        return loss

    def grad_max():
        g = loss_grad()[1]
        return g.abs().max().item(), (g @ a_HH).abs().max().item()

    lbfgs_to_tolerance(wp, closure, grad_max, max_iter, tolerance)
    return ((wp.detach() @ a_HH.T) / scale_H).contiguous()


COV_ROWS = 16
"""The covariance for whitening is taken on about COV_ROWS x H rows (whole windows: `whitening_windows`)."""


def whitening_windows(
    fit_window_ids: torch.Tensor, n_fit_windows: int, seq_len: int, hidden: int
) -> torch.Tensor:
    """Which of these fit windows (their global indices, in row order) give the whitening covariance: every
    k-th fit window by global index, k such that about COV_ROWS x H rows are taken, so one rank and many pick
    the same ones -> a bool per window (the `cov_blocks` of the fit, with block = seq_len)."""
    every = max(1, math.ceil(n_fit_windows * seq_len / (COV_ROWS * hidden)))
    return fit_window_ids % every == 0


WHITEN_EVALS = 20
"""Whiten only when the covariance costs at most this many loss-and-gradient evaluations (2 T H E
multiply-adds each): it saves 20-40 evaluations a layer on the demo (H = 576, E = 6), and at H = 8192 on all
rows it would cost hundreds (docs/speed.md section 8)."""


def _whitening(x, scale_H, num_experts, n, reduce, block, cov_blocks) -> torch.Tensor:
    """The fit's A (`whitener`) from the scaled features' covariance over the rows of `cov_blocks` (a bool per
    block of `block` rows; None: all), or the identity when that covariance would cost more than
    WHITEN_EVALS evaluations of the loss and gradient. The same on every rank (sums all-reduced)."""
    hidden = x.shape[1]
    eye = torch.eye(hidden, dtype=torch.float32, device=x.device)
    if num_experts < 2:
        return eye
    if cov_blocks is not None:
        rows = cov_blocks.to(x.device).repeat_interleave(block)[: x.shape[0]]
        x = x[rows]
    n_cov = reduce(torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)).item()
    if n_cov * hidden > 2 * WHITEN_EVALS * n * num_experts:
        return eye
    s64 = scale_H.to(torch.float64)
    gram = reduce(_blocked_sum(x, x, block)) / s64[:, None] / s64[None, :]  # of the scaled features
    return whitener(gram, n_cov)


def soft_temperature_sharded(err_TE: torch.Tensor, gather) -> float:
    """soft_temperature over all ranks' tokens (the gaps, one scalar per token, are gathered)."""
    if err_TE.shape[1] < 2:
        return 1.0
    two = torch.topk(err_TE, 2, dim=-1, largest=False).values
    gap = gather(two[:, 1] - two[:, 0]).median().item()
    return gap if gap > 0 else 1.0


def noise_weight_init_sharded(x_TH: torch.Tensor, w_EH: torch.Tensor, ratio: float, reduce, gather):
    """noise_weight_init over all ranks' tokens: the mean input is an all-reduced sum, the two medians are
    over gathered per-token scalars."""
    num_experts = w_EH.shape[0]
    if num_experts < 2 or ratio <= 0:
        return torch.zeros_like(w_EH)
    two = torch.topk(x_TH.to(torch.float32) @ w_EH.T, 2, dim=-1).values
    target_std = ratio * gather(two[:, 0] - two[:, 1]).median().item()
    n = reduce(torch.tensor([float(x_TH.shape[0])], dtype=torch.float64)).item()
    u_H = reduce(x_TH.sum(0, dtype=torch.float64)) / n
    if u_H.norm() == 0 or target_std <= 0:
        return torch.zeros_like(w_EH)
    u_H = u_H / u_H.norm()
    m = gather(_project64(x_TH, u_H)).median().item()
    if abs(m) < 1e-6:
        return torch.zeros_like(w_EH)
    pre = math.log(math.expm1(target_std)) if target_std < 30 else target_std  # softplus^-1
    return (u_H * (pre / m)).to(w_EH.dtype).expand(num_experts, -1).contiguous()


def routing_sums(x_TH: torch.Tensor, w_EH: torch.Tensor, err_TE: torch.Tensor) -> torch.Tensor:
    """float64 [4 + E]: tokens, tokens whose router top-1 is the best expert, the error of the chosen expert,
    the best error, then the count of tokens each expert is best for: label_accuracy, excess_error and the
    label shares of a sharded fit are ratios of these all-reduced sums."""
    chosen = (x_TH.to(torch.float32) @ w_EH.T).argmax(-1)
    best = err_TE.argmin(-1)
    head = torch.tensor(
        [
            float(x_TH.shape[0]),
            chosen.eq(best).sum().item(),
            err_TE.gather(1, chosen[:, None]).to(torch.float64).sum().item(),
            err_TE.min(-1).values.to(torch.float64).sum().item(),
        ],
        dtype=torch.float64,
    )
    return torch.cat([head, torch.bincount(best, minlength=err_TE.shape[1]).to(torch.float64).cpu()])
