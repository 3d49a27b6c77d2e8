"""Baselines as their papers define them: LLaMA-MoE's disjoint random split, FLAP's adaptive widths
(per-layer expert widths in the model format), the random-halves rename, parameter counts."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dive_ds.build.expert_plan import ReconstructConfig, plan_experts
from dive_ds.build.moe_writer import write_moe, write_moe_shards
from dive_ds.eval.perplexity import pruned_ffn
from dive_ds.io.calibration import load_calibration
from dive_ds.io.placement import NodePlacement
from dive_ds.models.moe import DiveExperts, DiveMoeConfig, count_parameters
from dive_ds.stats import adaptive_widths, channel_scores, llama_moe_partition, n_keep
from tests.fixtures.tiny import make_tiny_calibration

F, L = 48, 3  # the tiny model's FFN width and layers (tests/fixtures/tiny.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_calibration(tmp_path_factory.mktemp("tiny"))


# --------------------------------------------------------------------------- LLaMA-MoE split


@pytest.mark.parametrize("ffn,n", [(48, 4), (48, 6), (50, 4)])
def test_llama_moe_partition_puts_every_channel_in_one_expert(ffn, n):
    kept_ELK = llama_moe_partition(ffn, n, L, torch.Generator().manual_seed(0))
    assert kept_ELK.shape == (n, L, ffn // n)
    for layer in range(L):
        chans = kept_ELK[:, layer].flatten().tolist()
        assert len(set(chans)) == len(chans)  # disjoint
        assert len(chans) == ffn - ffn % n  # every channel once; the F % N remainder in none
        assert all(torch.equal(k, k.sort().values) for k in kept_ELK[:, layer])
    assert not torch.equal(kept_ELK[:, 0], kept_ELK[:, 1])  # a new permutation per layer
    assert torch.equal(kept_ELK, llama_moe_partition(ffn, n, L, torch.Generator().manual_seed(0)))


def test_llama_moe_plan_and_its_prune_ratio(tiny):
    cal = load_calibration(tiny[1])
    with pytest.raises(ValueError, match=r"llama-moe .* use --prune-ratio 0.75 \(= 1 - 1/4\)"):
        ReconstructConfig(num_experts=4, top_k=2, prune_ratio=0.5, method="llama-moe")
    cfg = ReconstructConfig(num_experts=6, top_k=3, prune_ratio=1 - 1 / 6, method="llama-moe")
    plan = plan_experts(cal.stats, cal.domains, None, cfg)
    assert plan.widths_L == [F // 6] * L  # 6 experts of F/6, top-3: half the FFN active
    for layer in range(L):
        assert sorted(plan.kept_ELK[:, layer].flatten().tolist()) == list(range(F))
    pooled = cal.stats.merged(list(range(len(cal.domains))))
    assert torch.equal(plan.mean_ELF[5], pooled.sum_DLF[0] / pooled.count_D[0])  # pooled-mean compensation
    assert ReconstructConfig(num_experts=1, top_k=1, prune_ratio=0.0, method="llama-moe")


def test_random_split_is_a_deprecated_name_of_random_halves(tiny):
    cal = load_calibration(tiny[1])
    old = ReconstructConfig(num_experts=3, prune_ratio=0.5, method="random-split")
    new = ReconstructConfig(num_experts=3, prune_ratio=0.5, method="random-halves")
    assert old == new and old.method == "random-halves"
    plan = plan_experts(cal.stats, cal.domains, None, old)
    assert torch.equal(plan.kept_ELK, plan_experts(cal.stats, cal.domains, None, new).kept_ELK)
    assert plan.widths_L == [24] * L  # 3 random halves: they overlap (independent sets when N * K > F)


# --------------------------------------------------------------------------- FLAP adaptive widths


def _flap_adaptive(tiny, tmp_path, prune_ratio=0.5):
    model_dir, calib_dir = tiny
    cal = load_calibration(calib_dir)
    cfg = ReconstructConfig(num_experts=1, top_k=1, prune_ratio=prune_ratio, method="flap-adaptive")
    plan = plan_experts(cal.stats, cal.domains, None, cfg)
    return cal, cfg, plan, write_moe(model_dir, plan, cfg, tmp_path / "moe")


def test_flap_adaptive_plan_keeps_the_uniform_total_and_top_z(tiny, tmp_path):
    cal, cfg, plan, out = _flap_adaptive(tiny, tmp_path)
    assert sum(plan.widths_L) == L * n_keep(F, 0.5) and len(set(plan.widths_L)) > 1
    assert plan.groups == {"flap_all": cal.domains}
    with pytest.raises(ValueError, match="per-layer expert widths"):
        _ = plan.kept_ELK
    config = json.loads((out / "config.json").read_text())
    assert config["expert_intermediate_sizes"] == plan.widths_L
    assert config["expert_intermediate_size"] == max(plan.widths_L)
    meta = json.loads((out / "dive_experts.json").read_text())
    assert meta["expert_width"] == plan.widths_L
    assert meta["parameters"]["total"] == count_parameters(DiveMoeConfig.from_pretrained(out))["total"]
    with pytest.raises(ValueError, match="use --experts 1 --top-k 1"):
        ReconstructConfig(num_experts=2, method="flap-adaptive")


def test_flap_adaptive_moe_equals_the_pruned_dense_model(tiny, tmp_path):
    model_dir, _ = tiny
    cal, _, plan, out = _flap_adaptive(tiny, tmp_path)
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert [layer.mlp.experts.down_proj.shape[-1] for layer in moe.model.layers] == plan.widths_L
    assert sum(p.numel() for p in moe.parameters()) == count_parameters(moe.config)["total"]
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pruned_ffn(dense, [k[0] for k in plan.kept_L], plan.mean_ELF[0]):
        expected = dense(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # the channels are FLAP's global top-z choice on the pooled scores
    widths, kept = adaptive_widths(channel_scores(cal.stats.merged(list(range(len(cal.domains)))))[0], L * 24)
    assert widths == plan.widths_L and all(torch.equal(a, b[0]) for a, b in zip(kept, plan.kept_L))


def test_per_layer_widths_are_refused_where_unsupported(tiny, tmp_path):
    model_dir, _ = tiny
    _, cfg, plan, out = _flap_adaptive(tiny, tmp_path)
    placement = NodePlacement(node=0, nodes=1, gpus_per_node=1, ep_size=1)
    with pytest.raises(ValueError, match="sharded format does not support"):
        write_moe_shards(model_dir, plan, cfg, tmp_path / "shards", placement)
    config = DiveMoeConfig.from_pretrained(out)
    with pytest.raises(ValueError, match="expert parallelism and sharded folders do not support"):
        DiveExperts(config, expert_ids=[0])  # as an expert-parallel block builds them
    from dive_ds.io.export import mixtral_config

    with pytest.raises(ValueError, match="different expert widths"):
        mixtral_config(config)
    with pytest.raises(ValueError, match="one positive width per layer"):
        DiveMoeConfig(num_hidden_layers=2, expert_intermediate_sizes=[4])


def test_llama_moe_as_published_adds_its_parts_back_to_the_dense_ffn(tiny, tmp_path):
    """LLaMA-MoE with all N experts active, equal gates (zero router) and the expert-output scale k = N,
    no compensation: the experts' outputs add up to the dense FFN's, so the logits are the dense model's.
    With scale 1 the N partial FFNs are averaged instead, and the model is not the dense one."""
    model_dir, calib = tiny
    cal = load_calibration(calib)
    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense(ids).logits
    for scale, equal in ((4.0, True), (1.0, False)):
        cfg = ReconstructConfig(num_experts=4, top_k=4, prune_ratio=0.75, method="llama-moe",
                                bias_compensation=False, output_scale=scale)  # fmt: skip
        plan = plan_experts(cal.stats, cal.domains, None, cfg)
        plan.router_ELH.zero_()  # equal logits: every gate 1/4 after the top-k softmax
        out = write_moe(model_dir, plan, cfg, tmp_path / f"s{scale}")
        moe = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            got = moe(ids).logits
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4) == equal, scale
