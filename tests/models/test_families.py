"""The dense families DIVE accepts besides Llama, as tiny random models built on the fly (no download):
Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k norms; head_dim != hidden / heads, as in the real models).

Each goes calibrate -> reconstruct -> evaluate -> one retraining step, and its MoE gives the dense model's
logits when the experts partition the FFN channels and every token goes to every expert with weight 1.
A family (or a setting) the MoE cannot reproduce is refused by name before any weight is read.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from dive_ds.cli import main
from dive_ds.io.loading import load_causal_lm
from dive_ds.models.moe import DiveMoeConfig, moe_blocks
from dive_ds.train.config_load import read_mapping, run_config_from_dict
from tests.fixtures.procs import one_line_error
from tests.fixtures.tiny import make_tiny_calibration
from tests.fixtures.train_setup import ZERO2, base_run, step_losses, write_tiny_registry

FAMILIES = {"mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}}
VOCAB = 260  # the byte tokenizer of the retraining stream needs >= 257
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_scatter_tensor.*:FutureWarning"),
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, dense folder, calibration folder, scratch root) of one family's tiny model."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    dense_dir, calib = make_tiny_calibration(
        root, n_domains=2, windows=4, n_eval=2, model_family=name, vocab_size=VOCAB, num_hidden_layers=2,
        **FAMILIES[name],
    )  # fmt: skip
    return name, dense_dir, calib, root


def route_every_token_to_every_expert(model) -> None:
    """Every block sends each token to all E experts with weight 1 (the router is bypassed)."""
    for block in moe_blocks(model):
        e = block.num_experts
        block.route = lambda x_TH, e=e: (torch.arange(e).expand(x_TH.shape[0], e), torch.ones(x_TH.shape[0], e), None)  # fmt: skip


@pytest.mark.usefixtures("world")
def test_family_calibrate_reconstruct_evaluate_retrain_and_moe_equals_dense(family, tmp_path):
    name, dense_dir, calib, root = family
    moe = tmp_path / "moe"
    # 2 experts of 24 of the 48 channels each, disjoint (random split, N x K = F): together every channel
    argv = ["reconstruct", "--calib", str(calib), "--method", "random-split", "--experts", "2",
            "--prune-ratio", "0.5", "--no-bias-compensation", "--out", str(moe)]  # fmt: skip
    assert main(argv) == 0
    config = DiveMoeConfig.from_pretrained(moe)
    assert (config.dense_model_type, config.expert_intermediate_size) == (name, 24)

    dense = load_causal_lm(dense_dir, dtype=torch.float32).eval()
    model = load_causal_lm(moe, dtype=torch.float32).eval()
    route_every_token_to_every_expert(model)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = dense(ids).logits, model(ids).logits
    print(f"{name}: MoE (2 experts, every token to both at weight 1) vs dense, max |logit diff| "
          f"{(got - want).abs().max().item():.2e} (logits up to {want.abs().max().item():.2f})")  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert type(model.model.layers[0].self_attn) is type(dense.model.layers[0].self_attn)  # its own attention

    assert main(["evaluate", str(moe), "--calib", str(calib), "--out", str(tmp_path / "ev")]) == 0
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(res["router"]) == {"dom0", "dom1"} and all(math.isfinite(v) for v in res["router"].values())

    from dive_ds.train.retrain import train

    raw = base_run(
        {"model": moe, "registry": write_tiny_registry(root)}, tmp_path / "rt",
        stages={"router": {"enabled": False}, "experts": {"steps": 1, "lr": 1.0e-2}},
        eval={"every": 0, "windows_per_domain": 1, "batch_size": 1, "at_start": False},
        checkpoint={"every": 0, "keep": 1},
    )  # fmt: skip
    train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    losses = step_losses(tmp_path / "rt")
    assert list(losses) == [("experts", 1)] and math.isfinite(losses[("experts", 1)])
    trained = load_causal_lm(tmp_path / "rt" / "model", dtype=torch.float32)
    assert trained.config.dense_model_type == name
    before = dict(load_causal_lm(moe, dtype=torch.float32).named_parameters())
    attention = {k: v for k, v in trained.named_parameters() if ".self_attn." in k and "norm" not in k}
    assert attention and all(torch.equal(v, before[k]) for k, v in attention.items())  # frozen, kept


@pytest.mark.parametrize(
    "family,kw,msg",
    [
        ("mistral", {"sliding_window": 16}, "model_type 'mistral' with sliding_window=16 < max_position_embeddings=128"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
         "model_type 'qwen2' with sliding_window=16 < max_position_embeddings=128"),
        ("gemma", {}, "model_type 'gemma' has no supported gated MLP (gate_proj/up_proj/down_proj) with an attention"),
    ],
)  # fmt: skip
def test_family_the_moe_cannot_reproduce_is_refused_by_name(family, kw, msg, tmp_path, capsys):
    """Only a config.json: the refusal comes before any weight (or text) is read."""
    config_cls = getattr(transformers, f"{family.capitalize()}Config")
    config_cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, vocab_size=VOCAB, **kw).save_pretrained(tmp_path)  # fmt: skip
    assert main(["calibrate", "--model", str(tmp_path), "--domains", str(tmp_path / "none.yaml"),
                 "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert msg in one_line_error(capsys)
