"""Router fitting: exact on separable data, deterministic, streaming == whole model, better than init;
the sparse-stage gate gives a top-1 router a gradient."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.fit_router import run_fit_router
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.build.router_config import RouterFitConfig
from dive_ds.build.router_math import (
    expert_errors,
    fit_linear_router,
    label_accuracy,
    noise_weight_init,
    removed_channels,
    router_loss_grad,
    sliced_errors,
    soft_targets,
    whitening_windows,
)
from dive_ds.build.router_pass import fit_routers
from dive_ds.io.calibration import load_calibration
from dive_ds.models.moe import DiveMoeConfig, DiveRouter, gate_weights, moe_blocks
from tests.fixtures.tiny import make_tiny_calibration

FIT = RouterFitConfig(progress=False, holdout_every=3, max_iter=100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    model_dir, calib_dir = make_tiny_calibration(root, n_domains=4, windows=6, seq_len=16)
    moe = run_reconstruct(calib_dir, None, root / "moe", ReconstructConfig(num_experts=3, method="nomining"))
    return model_dir, calib_dir, moe


def test_linearly_separable_labels_are_fitted_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g) * torch.linspace(0.1, 5.0, 16)  # badly scaled features
    w_true = torch.randn(4, 16, generator=g)
    labels = (x @ w_true.T).argmax(-1)
    w = fit_linear_router(x, labels, 4, l2=0.0, max_iter=500)
    assert (x @ w.T).argmax(-1).eq(labels).float().mean().item() == 1.0
    assert label_accuracy(x, w, -F.one_hot(labels, 4).float()) == 1.0


@pytest.mark.parametrize("kind", ["labels", "soft"])
def test_closed_form_loss_and_gradient_equal_autograd(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (50,), generator=g)
    target = (
        y if kind == "labels" else torch.softmax(torch.randn(50, 3, generator=g, dtype=torch.float64), -1)
    )
    loss, grad = router_loss_grad(x, target, w.detach(), 0.3)
    ref = F.cross_entropy(x @ w.T, target) + 0.15 * (w * w).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, w.grad, rtol=1e-12, atol=1e-12)


def test_fit_stops_at_its_gradient_tolerance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 12, generator=g)
    labels = (x @ torch.randn(3, 12, generator=g).T + torch.randn(400, 3, generator=g)).argmax(-1)
    scale = x.pow(2).mean(0).sqrt()
    for tol in (1e-2, 1e-3):
        w = fit_linear_router(x, labels, 3, l2=1e-2, max_iter=500, tolerance=tol)
        _, grad = router_loss_grad(x / scale, labels, w * scale, 1e-2)
        assert grad.abs().max().item() <= tol
    loose = fit_linear_router(x, labels, 3, l2=1e-2, max_iter=500, tolerance=1e-2)
    _, grad = router_loss_grad(x / scale, labels, loose * scale, 1e-2)
    assert grad.abs().max().item() > 1e-5  # it did stop early, not at the optimum


def test_sliced_errors_equal_running_each_sliced_expert():
    g = torch.Generator().manual_seed(5)
    ffn, hidden, t = 40, 6, 9
    kept = [torch.randperm(ffn, generator=g)[:20].sort().values for _ in range(4)]
    kept[1] = torch.cat([kept[1][:10], kept[0][:3]]).unique()  # some channels kept by two experts
    removed = removed_channels(kept, ffn)
    common, own = removed
    everyone = set(range(ffn)) - set(torch.cat(kept).tolist())
    assert common.tolist() == sorted(everyone) and len(everyone) > 0
    for k, r in zip(kept, own):  # common + own: exactly the complement of the kept channels
        assert sorted(k.tolist() + r.tolist() + common.tolist()) == list(range(ffn)) and r.tolist() == sorted(
            r.tolist()
        )
    h = torch.randn(t, ffn, generator=g, dtype=torch.float64)
    w_down = torch.randn(hidden, ffn, generator=g, dtype=torch.float64)
    bias = torch.randn(4, hidden, generator=g, dtype=torch.float64)
    y = h @ w_down.T
    y_e = torch.stack([h[:, k] @ w_down[:, k].T + bias[e] for e, k in enumerate(kept)])
    torch.testing.assert_close(
        sliced_errors(h, w_down, removed, bias), expert_errors(y, y_e), rtol=1e-10, atol=1e-10
    )
    y_e = torch.stack([h[:, k] @ w_down[:, k].T for k in kept])  # and without biases
    torch.testing.assert_close(
        sliced_errors(h, w_down, removed, None), expert_errors(y, y_e), rtol=1e-10, atol=1e-10
    )


def test_soft_targets_and_errors():
    y_dense = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y_exp = torch.stack([torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])])
    err = expert_errors(y_dense, y_exp)
    assert err.tolist() == [[0.0, 1.0], [4.0, 1.0]]
    q = soft_targets(err, tau=1.0)
    torch.testing.assert_close(q[0], torch.softmax(torch.tensor([0.0, -1.0]), 0))
    torch.testing.assert_close(q[1], torch.softmax(torch.tensor([-3.0, 0.0]), 0))


def test_noise_init_hits_its_target_std():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g) * 0.3 + torch.linspace(1, 2, 8)
    w = torch.randn(3, 8, generator=g)
    nw = noise_weight_init(x, w, 0.5)
    two = torch.topk(x @ w.T, 2, -1).values
    target = 0.5 * (two[:, 0] - two[:, 1]).median()
    std = F.softplus(x @ nw.T)
    assert abs(std.median().item() - target.item()) / target.item() < 0.1


def test_fitting_is_deterministic_and_beats_the_random_init(tiny):
    model_dir, calib_dir, moe = tiny
    cal = load_calibration(calib_dir)
    r1, rep1 = fit_routers(moe, model_dir, cal.calib, FIT)
    r2, _ = fit_routers(moe, model_dir, cal.calib, FIT)
    for layer in r1:
        for k in r1[layer]:
            assert torch.equal(r1[layer][k], r2[layer][k])
    acc = [r["label_accuracy_heldout"] for r in rep1["layers"]]
    init = [r["label_accuracy_heldout_init"] for r in rep1["layers"]]
    print(acc, init)
    assert sum(acc) / len(acc) > sum(init) / len(init) + 0.15
    assert rep1["mean_excess_error_heldout"] < sum(r["excess_error_heldout_init"] for r in rep1["layers"]) / 3


def test_a_fit_on_fewer_windows_than_holdout_every_still_holds_some_out(tiny):
    """2 windows per domain, every 3rd held out: counted per domain nothing was (accuracy nan, as
    `compare --fit-windows 4` once printed); counted over all 8 windows in order, windows 2 and 5 are."""
    model_dir, calib_dir, moe = tiny
    cal = load_calibration(calib_dir)
    seq_len = next(iter(cal.calib.values())).shape[1]
    _, rep = fit_routers(moe, model_dir, cal.calib, replace(FIT, windows_per_domain=2, max_iter=5))
    assert rep["heldout_tokens"] == 2 * seq_len
    assert all(0.0 <= r["label_accuracy_heldout"] <= 1.0 for r in rep["layers"])


def test_streaming_fit_equals_whole_model_fit(tiny):
    """Reference: the whole MoE in memory; layer by layer, capture its MLP inputs with the routers fitted
    so far, compute the dense FFN's outputs on them, label and fit with the same regression."""
    model_dir, calib_dir, moe = tiny
    cal = load_calibration(calib_dir)
    routers, _ = fit_routers(moe, model_dir, cal.calib, FIT)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.cat(list(cal.calib.values()))
    held = torch.cat([torch.arange(w.shape[0]) % 3 == 2 for w in cal.calib.values()])
    for layer, block in enumerate(moe_blocks(model)):
        got = {}

        def capture(_m, a, got=got):
            got["x"] = a[0].reshape(-1, a[0].shape[-1])

        hook = block.register_forward_pre_hook(capture)
        with torch.no_grad():
            model(input_ids=ids)
        hook.remove()
        x = got["x"]
        with torch.no_grad():
            y_dense = dense.model.layers[layer].mlp(x)
            ex = block.experts
            y_e = torch.stack(
                [ex(x, torch.full((len(x), 1), e), torch.ones(len(x), 1))[0] for e in range(ex.num_experts)]
            )
        err = expert_errors(y_dense, y_e).double()
        fit_rows = held.logical_not().repeat_interleave(ids.shape[1])
        fit_windows = torch.arange(len(held))[
            ~held
        ]  # blocks of a window's rows and the same whitening windows
        cov = whitening_windows(fit_windows, len(fit_windows), ids.shape[1], x.shape[1])
        w = fit_linear_router(
            x[fit_rows], err[fit_rows].argmin(-1), 3, FIT.l2, FIT.max_iter, FIT.tolerance, ids.shape[1], cov
        )
        torch.testing.assert_close(routers[layer]["gate.weight"], w, rtol=1e-3, atol=1e-4)
        with torch.no_grad():
            block.gate.weight.copy_(w)


def test_fitted_folder_loads_and_leaves_the_input_untouched(tiny, tmp_path):
    model_dir, calib_dir, moe = tiny

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = digest(moe)
    rep = run_fit_router(moe, calib_dir, tmp_path / "fitted", FIT)
    assert digest(moe) == before
    fitted = AutoModelForCausalLM.from_pretrained(tmp_path / "fitted")
    assert (
        json.loads((tmp_path / "fitted" / "router_fit.json").read_text())["target"] == rep["target"] == "hard"
    )
    w = moe_blocks(fitted)[1].gate.weight
    assert w.abs().sum() > 0
    with pytest.raises(ValueError, match="not empty"):
        run_fit_router(moe, calib_dir, tmp_path / "fitted", FIT)


def test_reconstruct_router_init_fit_equals_fit_router(tiny, tmp_path):
    model_dir, calib_dir, moe = tiny
    cfg = ReconstructConfig(num_experts=3, method="nomining", router_init="fit")
    out = run_reconstruct(calib_dir, None, tmp_path / "moe-fit", cfg)
    run_fit_router(moe, calib_dir, tmp_path / "separate", RouterFitConfig(progress=False))
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "separate")
    for x, y in zip(moe_blocks(a), moe_blocks(b)):
        assert torch.equal(x.gate.weight, y.gate.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # its temporary folder is gone


# --------------------------------------------------------------------------- the sparse-stage gate


def _router(gate: str, k: int = 1) -> DiveRouter:
    cfg = DiveMoeConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=11, num_local_experts=4, num_experts_per_tok=k,
                        router_gate=gate, router_noise=False)  # fmt: skip
    r = DiveRouter(cfg)
    torch.manual_seed(0)
    torch.nn.init.normal_(r.weight)
    return r


@pytest.mark.parametrize("k", [1, 2])
def test_gate_gradient_for_top1(k):
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    target = torch.randn(32, k, generator=torch.Generator().manual_seed(4))
    grads, values = {}, {}
    for gate in ("renorm", "straight_through", "switch"):
        r = _router(gate, k)
        out = r(x)
        loss = (out.weights_TK * target).sum()
        loss.backward()
        grads[gate], values[gate] = r.weight.grad.abs().sum().item(), out.weights_TK.detach()
    if k == 1:
        assert grads["renorm"] == 0.0  # the softmax over one chosen logit is 1: no gradient at all
        assert torch.equal(values["renorm"], torch.ones(32, 1))
    assert grads["straight_through"] > 1e-3 and grads["switch"] > 1e-3
    torch.testing.assert_close(values["straight_through"], values["renorm"], rtol=0, atol=1e-7)
    assert (values["switch"] < 1).all()


def test_gate_weights_pure():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)
    idx = torch.tensor([[0]])
    assert gate_weights(logits[:, :1], probs, idx, "renorm").item() == 1.0
    assert gate_weights(logits[:, :1], probs, idx, "switch").item() == pytest.approx(probs[0, 0].item())
    assert gate_weights(logits[:, :1], probs, idx, "straight_through").item() == pytest.approx(1.0)


def test_sharded_folder_fits_the_same_and_stays_sharded(tiny, tmp_path):
    from dive_ds.io.placement import NodePlacement
    from dive_ds.io.shard_reader import ShardedMoe

    model_dir, calib_dir, moe = tiny
    cfg = ReconstructConfig(num_experts=3, method="nomining")
    for node in (0, 1, 2):
        run_reconstruct(calib_dir, None, tmp_path / "shards", cfg,
                        shards=NodePlacement(node=node, nodes=3, gpus_per_node=1, ep_size=3))  # fmt: skip
    cal = load_calibration(calib_dir)
    from_hf, _ = fit_routers(moe, model_dir, cal.calib, FIT)
    from_shards, _ = fit_routers(tmp_path / "shards", model_dir, cal.calib, FIT)
    for layer in from_hf:
        for k in from_hf[layer]:
            assert torch.equal(from_hf[layer][k], from_shards[layer][k])
    run_fit_router(tmp_path / "shards", calib_dir, tmp_path / "fitted", FIT)
    sharded = ShardedMoe(tmp_path / "fitted")  # complete and valid
    assert torch.equal(sharded.shared_layer(2)["model.layers.2.mlp.gate.weight"], from_hf[2]["gate.weight"])
    old = ShardedMoe(tmp_path / "shards").shared_layer(2)["model.layers.2.mlp.gate.weight"]
    assert not torch.equal(old, from_hf[2]["gate.weight"])  # the input keeps its routers


def test_sliced_shortcut_equals_running_every_expert(tiny):
    from dataclasses import replace

    model_dir, calib_dir, moe = tiny
    cal = load_calibration(calib_dir)
    fast, rep_fast = fit_routers(moe, model_dir, cal.calib, FIT)
    slow, rep_slow = fit_routers(moe, model_dir, cal.calib, replace(FIT, sliced_shortcut=False))
    assert (rep_fast["sliced_layers"], rep_slow["sliced_layers"]) == (3, 0)
    for layer in fast:
        torch.testing.assert_close(
            fast[layer]["gate.weight"], slow[layer]["gate.weight"], rtol=1e-3, atol=1e-5
        )
    assert [r["label_share"] for r in rep_fast["layers"]] == [r["label_share"] for r in rep_slow["layers"]]


def test_whitened_coordinates_decorrelate_the_features_and_leave_the_logits_alone():
    """The fit's change of variables: A^T C A = I for the (ridged) covariance, and w = w' A^T gives the same
    logits as w' on the whitened features x A."""
    from dive_ds.build.router_math import WHITEN_RIDGE, whitener

    g = torch.Generator().manual_seed(8)
    mix = torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = torch.randn(500, 10, generator=g, dtype=torch.float64) @ mix  # correlated features
    a = whitener(x.T @ x, 500).double()
    c = x.T @ x / 500
    c = c + WHITEN_RIDGE * c.diagonal().mean() * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(a.T @ c @ a, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-5)
    wp = torch.randn(3, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(x @ (wp @ a.T).T, (x @ a) @ wp.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("top_k, shared", [(1, 0.0), (2, 0.0), (1, 0.125)])
def test_sliced_block_output_equals_the_block(tiny, tmp_path, top_k, shared):
    """The fit's carry from the dense intermediate == the MoE block run as it is (routing and weights, each
    expert's bias, the shared expert), for top-1, top-2 and a shared expert, under a fitted-like router."""
    from dive_ds.build.router_math import sliced_channels
    from dive_ds.build.router_pass import _dense_mlp, sliced_block_output
    from dive_ds.io.layers import MoeLayers, build_moe_layer
    from dive_ds.io.loading import LayerwiseCheckpoint

    model_dir, calib_dir, _ = tiny
    moe = run_reconstruct(calib_dir, None, tmp_path / "moe", ReconstructConfig(num_experts=3, top_k=top_k,
                          method="nomining", shared_ratio=shared))  # fmt: skip
    layers = MoeLayers(moe)
    g = torch.Generator().manual_seed(11)
    for layer in range(layers.config.num_hidden_layers):
        block = build_moe_layer(layers.config, layer, layers.layer_state(layer)).requires_grad_(False)
        w_gate, w_up, w_down = _dense_mlp(LayerwiseCheckpoint(model_dir), layer)
        kept = sliced_channels(block.mlp.experts, w_gate, w_up, w_down)
        assert kept is not None
        assert block.mlp.experts.bias is not None  # FLAP's compensation: the bias is part of the check
        block.mlp.gate.weight.data = torch.randn(block.mlp.gate.weight.shape, generator=g)
        block.mlp.gate.mode = "sparse"
        x = torch.randn(40, layers.config.hidden_size, generator=g)
        h = F.silu(x @ w_gate.T) * (x @ w_up.T)
        with torch.no_grad():
            want = block.mlp(x.unsqueeze(0))[0]
            got = sliced_block_output(block.mlp, x, h, kept)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert block.mlp.last_expert_counts.min() > 0  # every expert had rows to check


def test_whitened_fit_goes_on_until_its_own_gradient_meets_the_tolerance(monkeypatch):
    """L-BFGS stops on the whitened gradient; `lbfgs_to_tolerance` goes on until the gradient in the weights'
    own coordinates is below the tolerance, within max_iter iterations in all (a quadratic whose whitened
    gradient is 100x smaller than its own), and the fit meets its tolerance on correlated features."""
    import dive_ds.build.router_math as rm

    c = torch.tensor([1.0, 3.0, 10.0, 0.3])
    a_diag = torch.full((4,), 0.01)  # w = w' * 0.01: the whitened gradient is 100x smaller
    wp = torch.zeros(4, requires_grad=True)

    def own_grad():
        return 2 * c * (wp.detach() * a_diag - 1)

    def closure():
        w = wp.detach() * a_diag
        wp.grad = own_grad() * a_diag
        return (c * (w - 1) ** 2).sum()

    steps = []
    real = torch.optim.LBFGS.step
    monkeypatch.setattr(torch.optim.LBFGS, "step", lambda self, f: steps.append(1) or real(self, f))
    rm.lbfgs_to_tolerance(wp, closure, lambda: (own_grad().abs().max().item(), (own_grad() * a_diag).abs().max().item()),
                          200, 1e-3)  # fmt: skip
    assert own_grad().abs().max().item() <= 1e-3 and len(steps) >= 2
    g = torch.Generator().manual_seed(12)
    mix = torch.randn(16, 16, generator=g) + 3 * torch.eye(16)
    x = (torch.randn(2048, 16, generator=g) @ mix) * torch.linspace(0.3, 3.0, 16)
    labels = (x @ torch.randn(4, 16, generator=g).T + 2 * torch.randn(2048, 4, generator=g)).argmax(-1)
    scale = x.pow(2).mean(0).sqrt()
    for tol in (1e-3, 1e-4):
        w = fit_linear_router(x, labels, 4, l2=1e-3, max_iter=200, tolerance=tol, block=256)
        _, grad = router_loss_grad(x / scale, labels, w * scale, 1e-3)
        assert grad.abs().max().item() <= tol
    a = rm._whitening(x, scale, 4, 2048, lambda t: t, 256, None)
    assert not torch.equal(a, torch.eye(16))  # whitened here
    # a covariance dearer than WHITEN_EVALS evaluations (few tokens, wide features): not whitened
    wide = torch.randn(64, 512, generator=g)
    assert torch.equal(rm._whitening(wide, torch.ones(512), 2, 64, lambda t: t, 16, None), torch.eye(512))
    # the covariance of the marked blocks only
    half = rm._whitening(x, scale, 4, 2048, lambda t: t, 256, torch.tensor([True, False] * 4))
    assert not torch.equal(half, a)
