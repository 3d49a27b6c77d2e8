"""Experts cut from token clusters (issue 25, design 2): `calibrate --token-clusters N` clusters every layer's
MLP inputs in the streaming pass and keeps FLAP statistics per cluster; `reconstruct --groups-from clusters`
cuts expert c of layer l from layer l's cluster c."""

import json

import pytest
import torch

from dive_ds.build.affinity import adjusted_rand_index
from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.build.token_clusters import cluster_sums, kmeans
from dive_ds.io.calibration import load_calibration, write_calibration
from dive_ds.io.loading import load_dense_model
from dive_ds.stats import channel_scores, kept_channels, n_keep
from tests.fixtures.tiny import make_tiny_calibration


def test_planted_clusters_are_recovered():
    """Three well separated blobs in 8 dimensions, 40 points each, shuffled: ARI 1.0, and the same labels
    from any seed (up to their names)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[6.0] * 8, [-6.0] * 8, [6.0] * 4 + [-6.0] * 4])
    truth = torch.arange(3).repeat_interleave(40)
    x = centres[truth] + torch.randn(120, 8, generator=g)
    perm = torch.randperm(120, generator=g)
    x, truth = x[perm], truth[perm]
    for seed in range(5):
        c, labels = kmeans(x, torch.arange(120), 120, 3, iters=20, seed=seed)
        assert adjusted_rand_index(labels.numpy(), truth.numpy()) == 1.0, seed
        for k in range(3):  # each centroid is its cluster's mean
            torch.testing.assert_close(c[k], x[labels == k].double().mean(0))
    # deterministic for a seed
    assert torch.equal(
        kmeans(x, torch.arange(120), 120, 3, 20, 7)[1], kmeans(x, torch.arange(120), 120, 3, 20, 7)[1]
    )
    # 10 points on 2 locations, 3 clusters: the third seed is the lowest token id not taken yet
    two = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    c, labels = kmeans(two, torch.arange(10), 10, 3, iters=5, seed=0)
    assert torch.isfinite(c).all() and set(labels.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="more than the 120 calibration tokens"):
        kmeans(x, torch.arange(120), 120, 121, 5, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clusters")
    model, calib = make_tiny_calibration(root, n_domains=3, windows=4, seq_len=16, n_eval=2)
    cal = load_calibration(calib)
    stats, info = streaming_stats(
        model, cal.calib, CalibConfig(progress=False, token_clusters=3, batch_size=5)
    )
    clusters = info.pop("cluster_stats")
    out = root / "calib-clusters"
    samples = {
        n: type("S", (), {"calib": cal.calib[n], "eval": cal.eval[n], "split": None})() for n in cal.domains
    }
    write_calibration(out, stats, samples, cal.manifest, clusters=clusters)
    return {"root": root, "model": model, "calib": out, "cal": cal, "stats": stats, "clusters": clusters,
            "info": info}  # fmt: skip


def test_cluster_statistics_equal_a_whole_model_reference(tiny):
    """The streamed per-cluster sums == clustering each layer's MLP inputs of a whole-model forward with the
    same k-means and summing its down_proj inputs by label."""
    cal, got = tiny["cal"], tiny["clusters"]
    info = tiny["info"]["token_clusters"]
    assert (info["clusters"], info["iters"], info["seed"]) == (3, 10, 0)
    assert info["smallest_per_layer"] == [int(n) for n in got.count_D.min(0).values]
    model = load_dense_model(tiny["model"]).eval()
    ids = torch.cat(list(cal.calib.values()))
    inputs, downs = {}, {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, li=li: inputs.__setitem__(li, a[0])))
        hooks.append(
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, li=li: downs.__setitem__(li, a[0]))
        )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    total = ids.numel()
    for li in range(len(model.model.layers)):
        x, h = inputs[li].reshape(total, -1), downs[li].reshape(total, -1)
        _, labels = kmeans(x, torch.arange(total), total, 3, 10, 0 + li)
        want = cluster_sums(labels, x, h, 3)
        assert got.count_D[:, li].sum().item() == total
        torch.testing.assert_close(got.count_D[:, li], want["count"])
        torch.testing.assert_close(got.sum_DLF[:, li], want["sum"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sumsq_DLF[:, li], want["sumsq"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.mlp_in_sum_DLH[:, li], want["mlp_in"], rtol=1e-5, atol=1e-5)
    # the domain statistics of the same pass are those of a pass without clustering
    plain, _ = streaming_stats(tiny["model"], cal.calib, CalibConfig(progress=False, batch_size=5))
    assert torch.equal(plain.sum_DLF, tiny["stats"].sum_DLF)
    # each layer its own grouping: the cluster sizes are not the same in every layer
    assert len({tuple(got.count_D[:, li].tolist()) for li in range(3)}) > 1


def test_reconstruct_from_clusters_cuts_each_layers_experts_from_its_clusters(tiny, tmp_path):
    from safetensors.torch import load_file

    cfg = ReconstructConfig(num_experts=3, top_k=1, prune_ratio=0.5, groups_from="clusters")
    moe = run_reconstruct(tiny["calib"], None, tmp_path / "moe", cfg)
    clusters = load_calibration(tiny["calib"]).clusters
    assert clusters.count_D.shape == (3, 3)
    keep = n_keep(48, 0.5)
    dense = load_file(tiny["model"] / "model.safetensors")
    for layer in range(3):
        st = load_file(moe / f"model-layer-{layer:05d}.safetensors")
        gate_up = st[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        for c in range(3):
            kept = kept_channels(channel_scores(clusters.merged([c]))[0], keep)[layer]
            assert torch.equal(gate_up[c, :keep], dense[f"model.layers.{layer}.mlp.gate_proj.weight"][kept])
    groups = json.loads((moe / "dive_experts.json").read_text())["groups"]
    assert groups == {"cluster_0": ["cluster0"], "cluster_1": ["cluster1"], "cluster_2": ["cluster2"]}
    with pytest.raises(ValueError, match="has 3 token clusters per layer but --experts 2"):
        run_reconstruct(tiny["calib"], None, tmp_path / "moe2",
                        ReconstructConfig(num_experts=2, top_k=1, groups_from="clusters"))  # fmt: skip
    from dive_ds.build.expert_plan import cluster_groups
    from dive_ds.stats import ChannelStats

    thin = ChannelStats(torch.tensor([[5.0, 5.0], [1.0, 9.0]]), *(torch.zeros(2, 2, 4) for _ in range(2)),
                        torch.zeros(2, 2, 8), torch.zeros(2, 4), torch.zeros(2, 4))  # fmt: skip
    with pytest.raises(ValueError, match="token cluster 1 of layer 0 holds 1 token"):
        cluster_groups(thin, 2)
    with pytest.raises(ValueError, match="has no token clusters; calibrate with --token-clusters 3"):
        run_reconstruct(tiny["root"] / "calib", None, tmp_path / "moe3", cfg)


def test_cluster_sums_are_the_same_when_the_down_proj_inputs_are_computed_again(tiny, monkeypatch):
    """Where a layer's down_proj inputs would not fit in memory, the pass computes them again from the kept
    MLP inputs instead of keeping them from the forward: the same clusters and sums."""
    import dive_ds.build.calib_pass as cp

    assert not cp.fits_beside(10**18, torch.device("cpu"))  # more than any host has: computed again
    assert cp.fits_beside(1 << 20, torch.device("cpu"))
    monkeypatch.setattr(cp, "fits_beside", lambda *a, **k: False)
    cal = tiny["cal"]
    _, info = streaming_stats(
        tiny["model"], cal.calib, CalibConfig(progress=False, token_clusters=3, batch_size=5)
    )
    again, kept = info["cluster_stats"], tiny["clusters"]
    assert torch.equal(again.count_D, kept.count_D)
    for name in ("sum_DLF", "sumsq_DLF", "mlp_in_sum_DLH"):
        torch.testing.assert_close(getattr(again, name), getattr(kept, name), rtol=1e-6, atol=1e-6)
