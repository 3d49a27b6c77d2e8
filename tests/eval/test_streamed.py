"""Streamed evaluation and streamed mining (issue 23, items 1-2): one decoder layer resident, hidden states
carried, equal to the whole-model evaluation; the D x D pruned matrix from one pass over the dense model
equal to today's D whole-model passes; a sharded MoE folder evaluated like its HF twin."""

import json
import math

import numpy as np
import pytest
import torch

from dive_ds.build.evaluate import oracle_map
from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.mine import pruned_perplexities
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.cli import main
from dive_ds.eval.perplexity import domain_nll, domain_perplexities, pruned_ffn, routing_report
from dive_ds.eval.streamed import Variant, streamed_nll, streamed_report
from dive_ds.io.calibration import load_calibration
from dive_ds.io.loading import load_causal_lm, load_dense_model
from dive_ds.io.placement import NodePlacement
from dive_ds.parallel.ranks import Ranks
from dive_ds.stats import channel_scores, kept_channels, mean_var, n_keep
from tests.fixtures.tiny import make_tiny_calibration

REL = 1e-6  # float32 logits; the streamed and whole-model sums differ by rounding at most


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    model, calib = make_tiny_calibration(root, n_domains=3, windows=5, seq_len=16, n_eval=5)
    cfg = ReconstructConfig(num_experts=2, top_k=1, method="nomining")
    moe = run_reconstruct(calib, None, root / "moe", cfg)
    sharded = root / "sharded"
    for node in (1, 0):
        run_reconstruct(calib, None, sharded, cfg, shards=NodePlacement(node=node, nodes=2, gpus_per_node=1,
                                                                         ep_size=2))  # fmt: skip
    return {"root": root, "dense": model, "calib": calib, "moe": moe, "sharded": sharded,
            "cal": load_calibration(calib)}  # fmt: skip


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(abs(a[k] / b[k] - 1) for k in a)


@pytest.mark.parametrize(
    "family,tied", [("llama", True), ("qwen3", True), ("qwen2", False), ("mistral", False)]
)
def test_streamed_dense_equals_whole_model(tmp_path, family, tied):
    """Each family's own decoder layer and rotary embedding; untied models read their own lm_head."""
    model, calib = make_tiny_calibration(tmp_path, n_domains=2, windows=3, seq_len=16, n_eval=3,
                                         model_family=family, tie_word_embeddings=tied)  # fmt: skip
    evals = load_calibration(calib).eval
    whole = domain_perplexities(load_causal_lm(model).eval(), evals, batch_size=2)
    streamed = streamed_report(model, evals, batch_size=2)["router"]
    assert _close(streamed, whole) < REL
    assert min(whole.values()) > 1.0


def test_streamed_moe_router_oracle_and_load_equal_whole_model(tiny):
    evals = tiny["cal"].eval
    mapping = oracle_map(tiny["moe"], list(evals))
    m = load_causal_lm(tiny["moe"]).eval()
    rr = routing_report(m, evals, batch_size=2, expected=mapping)
    oracle = domain_perplexities(m, evals, batch_size=2, oracle=mapping)
    got = streamed_report(tiny["moe"], evals, oracle=mapping, expected=mapping, batch_size=3)
    assert _close(got["router"], rr["ppl"]) < REL
    assert _close(got["oracle"], oracle) < REL
    for name in evals:  # shares of routed rows: exact counts, equal
        assert np.allclose(got["expert_load"][name], rr["expert_load"][name], rtol=0, atol=1e-12)
        assert got["routed_to_own_expert"][name] == pytest.approx(rr["routed_to_own_expert"][name], abs=1e-12)
    # router and oracle routing differ on this model, so the oracle stream really was routed by domain
    assert max(abs(got["router"][n] - got["oracle"][n]) for n in evals) > 1e-3


def test_sharded_folder_evaluates_like_its_hf_twin(tiny, tmp_path):
    """`dive-ds evaluate` of the sharded layout (streamed; it cannot be loaded whole) == of the HF folder."""
    outs = {}
    for kind in ("moe", "sharded"):
        outs[kind] = tmp_path / kind
        assert main(["evaluate", str(tiny[kind]), "--calib", str(tiny["calib"]), "--device", "cpu",
                     "--out", str(outs[kind])]) == 0  # fmt: skip
    a, b = (json.loads((outs[k] / "eval.json").read_text()) for k in ("moe", "sharded"))
    assert a["evaluated"] == b["evaluated"] == "streamed"
    assert _close(a["router"], b["router"]) < REL and _close(a["oracle"], b["oracle"]) < REL
    assert a["params"] == b["params"]
    whole = tmp_path / "whole"
    assert main(["evaluate", str(tiny["moe"]), "--calib", str(tiny["calib"]), "--device", "cpu", "--whole-model",
                 "--out", str(whole)]) == 0  # fmt: skip
    c = json.loads((whole / "eval.json").read_text())
    assert c["evaluated"] == "whole model" and _close(a["router"], c["router"]) < REL
    assert a["params"] == c["params"]
    for name, load in a["expert_load"].items():
        assert np.allclose(load, c["expert_load"][name], rtol=0, atol=1e-12)


def test_streamed_mining_matrix_equals_whole_model_passes(tiny):
    """mine's D x D matrix from one streamed pass == D whole-model passes with pruned_ffn (the code before)."""
    cal, names = tiny["cal"], tiny["cal"].domains
    keep = n_keep(cal.stats.sum_DLF.shape[2], 0.5)
    got = pruned_perplexities(cal, tiny["dense"], cal.eval, keep, "wifv", True, 2, Ranks())
    dense = load_dense_model(tiny["dense"])
    scores = channel_scores(cal.stats, "wifv")
    mean, _ = mean_var(cal.stats.count_D, cal.stats.sum_DLF, cal.stats.sumsq_DLF)
    want = np.zeros((len(names), len(names)))
    for i in range(len(names)):
        with pruned_ffn(dense, kept_channels(scores[i], keep), mean[i]):
            nll, tok = domain_nll(dense, {n: cal.eval[n] for n in names}, batch_size=2)
        want[i] = (nll / tok).exp().numpy()
    assert np.allclose(got, want, rtol=REL, atol=0)
    assert not np.allclose(want, want[0])  # the D masks give different models


def test_a_dense_folder_refuses_routing_variants(tiny):
    with pytest.raises(
        ValueError, match="is a dense model: router and oracle routing need a dive_moe folder"
    ):
        streamed_nll(tiny["dense"], tiny["cal"].eval, [Variant("router", count_experts=True)])


def test_streamed_sums_count_every_predicted_token(tiny):
    evals = tiny["cal"].eval
    sums = streamed_nll(tiny["dense"], evals, [Variant("a"), Variant("b")], batch_size=4)
    assert sums.tokens_D.tolist() == [w.shape[0] * (w.shape[1] - 1) for w in evals.values()]
    assert torch.equal(sums.nll_VD[0], sums.nll_VD[1])  # two identical variants, one resident layer
    assert all(math.isfinite(x) for x in sums.ppl(0).tolist())
