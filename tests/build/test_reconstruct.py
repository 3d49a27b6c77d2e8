"""Expert reconstruction: exact slicing, bias formula, streaming memory, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dive_ds.build.expert_plan import ReconstructConfig, plan_experts
from dive_ds.build.moe_writer import write_moe
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.eval.perplexity import PrunedMLP
from dive_ds.io.calibration import load_calibration
from dive_ds.stats import channel_scores, kept_channels, mean_var
from tests.fixtures.tiny import make_tiny_calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_calibration(tmp_path_factory.mktemp("tiny"))


def _groups(tmp_path, groups):
    p = tmp_path / "groups.json"
    p.write_text(json.dumps(groups))
    return p


def test_expert_equals_sliced_dense_plus_bias(tiny, tmp_path):
    model_dir, calib_dir = tiny
    cfg = ReconstructConfig(num_experts=2, top_k=1, prune_ratio=0.5)
    out = run_reconstruct(
        calib_dir, _groups(tmp_path, {"a": ["dom0", "dom1"], "b": ["dom2", "dom3"]}), tmp_path / "moe", cfg
    )
    cal = load_calibration(calib_dir)
    dense = load_file(model_dir / "model.safetensors")
    moe = {}
    for f in out.glob("*.safetensors"):
        moe.update(load_file(f))
    st = cal.stats.merged([2, 3])
    kept = kept_channels(channel_scores(st, "wifv")[0], 24)  # F=48, r=0.5
    mean = mean_var(st.count_D, st.sum_DLF, st.sumsq_DLF)[0][0]
    for layer in range(3):
        p = f"model.layers.{layer}.mlp."
        g, u, d = (dense[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        k = kept[layer]
        torch.testing.assert_close(
            moe[p + "experts.gate_up_proj"][1], torch.cat([g[k], u[k]]), rtol=0, atol=0
        )
        torch.testing.assert_close(moe[p + "experts.down_proj"][1], d[:, k], rtol=0, atol=0)
        removed = torch.ones(48, dtype=torch.bool)
        removed[k] = False
        bias = d[:, removed].double() @ mean[layer][removed]
        torch.testing.assert_close(moe[p + "experts.bias"][1], bias.float())
        # attention and norms copied bit for bit
        for n in ("self_attn.q_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(moe[f"model.layers.{layer}.{n}"], dense[f"model.layers.{layer}.{n}"])


def test_pruned_expert_is_dense_with_zeroed_channels_plus_bias():
    torch.manual_seed(0)
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tests.fixtures.tiny import tiny_llama_config

    mlp = LlamaMLP(tiny_llama_config())
    x = torch.randn(5, 32)
    mean = torch.randn(48, dtype=torch.float64)
    kept = torch.tensor([0, 3, 7, 8, 20, 33, 47])
    from dive_ds.stats import compensation_bias

    bias = compensation_bias(mlp.down_proj.weight, mean, kept)
    y = PrunedMLP(mlp, kept, bias)(x)
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    mask = torch.zeros(48)
    mask[kept] = 1
    removed = mask == 0
    expected = (h * mask) @ mlp.down_proj.weight.T + (
        mlp.down_proj.weight[:, removed].double() @ mean[removed]
    ).float()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_one_expert_full_width_equals_dense(tiny, tmp_path):
    model_dir, calib_dir = tiny
    out = run_reconstruct(
        calib_dir,
        None,
        tmp_path / "up1",
        ReconstructConfig(num_experts=1, top_k=1, prune_ratio=0.0, method="upcycle"),
    )
    ids = torch.randint(0, 97, (2, 12))
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_baseline_plans(tiny):
    _, calib_dir = tiny
    cal = load_calibration(calib_dir)
    rs = plan_experts(
        cal.stats,
        cal.domains,
        None,
        ReconstructConfig(num_experts=2, prune_ratio=0.5, method="random-halves"),
    )
    # 2 x 24 channels of 48: a disjoint cover, per layer
    for layer in range(3):
        both = torch.cat([rs.kept_ELK[0, layer], rs.kept_ELK[1, layer]])
        assert sorted(both.tolist()) == list(range(48))
    nm = plan_experts(
        cal.stats, cal.domains, None, ReconstructConfig(num_experts=2, prune_ratio=0.5, method="nomining")
    )
    assert sorted(sum(nm.groups.values(), [])) == cal.domains
    fl = plan_experts(
        cal.stats, cal.domains, None, ReconstructConfig(num_experts=1, prune_ratio=0.5, method="flap")
    )
    pooled = cal.stats.merged([0, 1, 2, 3])
    assert torch.equal(fl.kept_ELK[0], kept_channels(channel_scores(pooled, "wifv")[0], 24))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(num_experts=2, top_k=3), "--top-k 3 must be between 1 and --experts 2"),
        (dict(prune_ratio=1.0), r"--prune-ratio must be in \[0, 1\)"),
        (dict(prune_ratio=-0.2), r"--prune-ratio must be in \[0, 1\)"),
    ],
)
def test_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ReconstructConfig(**kwargs)


def test_bad_groups_and_foreign_stats(tiny, tmp_path):
    model_dir, calib_dir = tiny
    cfg = ReconstructConfig(num_experts=2)
    with pytest.raises(ValueError, match="nope"):
        run_reconstruct(
            calib_dir,
            _groups(tmp_path, {"a": ["dom0", "nope"], "b": ["dom1", "dom2", "dom3"]}),
            tmp_path / "x",
            cfg,
        )
    with pytest.raises(ValueError, match="--experts 2 but .* has 3 groups"):
        run_reconstruct(
            calib_dir,
            _groups(tmp_path, {"a": ["dom0"], "b": ["dom1"], "c": ["dom2", "dom3"]}),
            tmp_path / "x",
            cfg,
        )
    with pytest.raises(ValueError, match="--experts 9 is larger than the 4 domains"):
        run_reconstruct(calib_dir, None, tmp_path / "x", ReconstructConfig(num_experts=9, method="nomining"))
    from tests.fixtures.tiny import save_tiny_llama

    other = tmp_path / "other"
    save_tiny_llama(other, seed=99)
    with pytest.raises(ValueError, match="come from another model"):
        run_reconstruct(
            calib_dir,
            _groups(tmp_path, {"a": ["dom0", "dom1"], "b": ["dom2", "dom3"]}),
            tmp_path / "x",
            cfg,
            model=str(other),
        )
    wide = tmp_path / "wide"
    save_tiny_llama(wide, seed=0, intermediate_size=64)
    with pytest.raises(ValueError, match="48 FFN channels but .* has 3 x 64"):
        run_reconstruct(
            calib_dir,
            _groups(tmp_path, {"a": ["dom0", "dom1"], "b": ["dom2", "dom3"]}),
            tmp_path / "x",
            cfg,
            model=str(wide),
        )
    assert not (tmp_path / "x").exists()


def test_write_moe_is_atomic(tiny, tmp_path, monkeypatch):
    model_dir, calib_dir = tiny
    cal = load_calibration(calib_dir)
    cfg = ReconstructConfig(num_experts=2, method="random-halves")
    plan = plan_experts(cal.stats, cal.domains, None, cfg)
    import dive_ds.build.moe_writer as rec

    calls = {"n": 0}
    real = rec.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(rec, "save_file", failing)
    with pytest.raises(OSError):
        write_moe(model_dir, plan, cfg, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    assert not list(tmp_path.glob(".moe.tmp-*"))
