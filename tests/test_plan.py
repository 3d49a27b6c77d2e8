"""`dive-ds plan` arithmetic: parameter counts equal the real model's, bytes by hand."""

import pytest
import torch

from dive_ds.cli import main
from dive_ds.models.moe import DiveMoeConfig, DiveMoeForCausalLM
from dive_ds.plan import PlanConfig, plan

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, tie_word_embeddings=False)  # fmt: skip


def test_param_counts_match_the_model():
    p = plan(
        TINY, PlanConfig(experts=4, top_k=2, prune_ratio=0.5, nodes=1, gpus_per_node=4, ep=2, stage="router")
    )
    torch.manual_seed(0)
    model = DiveMoeForCausalLM(DiveMoeConfig(**TINY, num_local_experts=4, num_experts_per_tok=2,
                                             expert_intermediate_size=24, expert_bias=True))  # fmt: skip
    assert p["params"]["total"] == sum(x.numel() for x in model.parameters())
    assert p["params"]["expert_width"] == 24
    # router stage: only the router weights train (4 experts x 32 hidden x 2 layers)
    assert p["params"]["trainable"] == 4 * 32 * 2


def test_bytes_by_hand():
    cfg = PlanConfig(experts=4, top_k=1, prune_ratio=0.5, nodes=1, gpus_per_node=4, ep=2, zero=2, stage="experts",
                     lora_rank=2, micro_batch=1, seq_len=8)  # fmt: skip
    p = plan(TINY, cfg)
    h, w, layers, e = 32, 24, 2, 4
    expert = 3 * w * h + h
    attn = 2 * h * 4 * 8 + 2 * h * 2 * 8
    non_expert = 97 * h * 2 + h + layers * (attn + 2 * h + 2 * e * h)
    # ZeRO-2: weights replicated except experts, which EP=2 splits
    assert p["per_gpu_bytes"]["weights"] == pytest.approx(2 * (non_expert + layers * e * expert / 2))
    lora = layers * e * (2 * (h + 2 * w) + 2 * (w + h))
    other = layers * (2 * e * h + 2 * h) + h
    # fp32 master + Adam moments (12 B) over 4 data-parallel ranks; LoRA over its 2 expert-data-parallel ranks
    assert p["per_gpu_bytes"]["optimizer"] == pytest.approx(12 * (other / 4 + lora / 2 / 2))
    assert p["params"]["trainable"] == lora + other


def test_plan_cli_and_errors(capsys):
    assert main(["plan", "--model", "llama2-70b", "--nodes", "4", "--ep", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "total 238.11B" in out and "fits 80 GB" in out
    assert main(["plan", "--model", "llama2-70b", "--experts", "6", "--ep", "4"]) == 2
    assert "--ep 4 must divide --experts 6" in capsys.readouterr().err
