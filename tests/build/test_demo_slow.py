"""The real SmolLM2 model on the real demo pack (marked slow; `make test` runs it)."""

import json
import math
from pathlib import Path

import pytest
import torch

from dive_ds.cli import main

pytestmark = pytest.mark.slow
DOMAINS = ["wiki_evals", "web_owt", "science_abstracts", "math_solutions", "drama_tragedies", "code_stdlib"]


def test_demo_model_loads_with_sane_perplexity():
    from dive_ds.build.calib_pass import CalibConfig, streaming_stats
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.sampler import SamplerConfig, sample_domain_text
    from dive_ds.eval.perplexity import perplexity
    from dive_ds.io.loading import demo_model_dir, load_dense_model, load_tokenizer

    path = demo_model_dir()
    model = load_dense_model(path)
    assert model.config.model_type == "llama" and model.config.intermediate_size == 1536
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tok = load_tokenizer(path, model.config)
    reg = load_registry("demo")
    cfg = SamplerConfig(samples_per_domain=2, seq_len=64, eval_windows=2, seed=0)
    samples = {
        d: sample_domain_text(d, list(iter_documents(reg.domains[d], cfg.chars_budget())), tok, cfg)
        for d in ("wiki_evals", "code_stdlib")
    }
    ppl = perplexity(model, samples["wiki_evals"].eval)
    assert 5 < ppl < 200, ppl  # a real pretrained model on encyclopedic text
    st, info = streaming_stats(path, {d: s.calib for d, s in samples.items()}, CalibConfig(progress=False))
    assert st.sum_DLF.shape == (2, 30, 1536) and st.count_D.tolist() == [128.0, 128.0]
    assert torch.isfinite(st.sumsq_DLF).all() and (st.sumsq_DLF > 0).float().mean() > 0.99
    assert info["tokens_per_s"] > 0


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--only",
                *DOMAINS,
                "--experts",
                "4",
                "--samples-per-domain",
                "16",
                "--seq-len",
                "128",
                "--eval-windows",
                "3",
                "--mining-eval-windows",
                "2",
                "--retrain-steps",  # the demo's own shape (no router stage: the router is fitted)
                "0",
                "2",
                "--retrain-batch",
                "2",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    m = s["mean_ppl"]
    # the default precision: the models built in fp32, scored in bf16 where this machine has it natively
    from dive_ds.parallel.ranks import auto_dtype, resolve_device

    score = auto_dtype(resolve_device("auto"))
    assert s["dtype"] == {"calibrate_fit_router": "fp32", "mine_evaluate": score}
    assert json.loads((out / "moe-clusters-fitted" / "router_fit.json").read_text())["dtype"] == "float32"
    dtypes = {f.parent.name: json.loads(f.read_text())["dtype"] for f in out.glob("eval-*/eval.json")}
    assert dtypes.pop("eval-clusters-retrained") == "float32"  # LoRA's small deltas: always scored in fp32
    assert set(dtypes.values()) == {"bfloat16" if score == "bf16" else "float32"} and len(dtypes) == 6
    print(json.dumps(s, indent=1))
    for v in (
        m["dense"]["router"],
        m["dive"]["oracle"],
        m["flap"]["router"],
        m["clusters-retrained"]["router"],
    ):
        assert math.isfinite(v)
    # the recommended MoE (the default): experts cut from each layer's token clusters, routers fitted from the
    # dense model; before any retraining it beats FLAP at the same activated width
    assert s["fitted"] == "clusters" and m["clusters-fitted"]["router"] < m["flap"]["router"]
    rec = json.loads((out / "moe-clusters-fitted" / "dive_experts.json").read_text())["reconstruction"]
    assert rec["groups_from"] == "clusters"
    assert (
        json.loads((out / "calib" / "manifest.json").read_text())["pass"]["token_clusters"]["clusters"] == 4
    )
    assert m["dense"]["router"] < m["dive"]["oracle"]  # pruning half the FFN costs, before retraining
    # the paper's claim on expert quality: diverse domain experts beat a random split and one pooled FLAP
    assert m["dive"]["oracle"] < m["random-split"]["oracle"]
    assert m["dive"]["oracle"] < m["flap"]["router"]
    groups = json.loads((out / "mining" / "groups.json").read_text())
    assert sorted(sum(groups.values(), [])) == sorted(DOMAINS) and len(groups) == 4
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(out / "moe-dive")
    assert type(moe).__name__ == "DiveMoeForCausalLM" and moe.config.num_local_experts == 4
    retrained = AutoModelForCausalLM.from_pretrained(
        out / "retrain" / "model"
    )  # LoRA merged: a plain MoE again
    assert not any("lora" in n for n, _ in retrained.named_parameters())
    assert any((out / "retrain").rglob("events.out.tfevents.*"))
    # the retraining ran each step's 2 sequences as one micro batch (ds_configs/zero2.json otherwise)
    ds = json.loads((out / "retrain" / "stages" / "experts" / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 1)
    zero2 = json.loads((Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == zero2["zero_optimization"]["stage"] == 2
