"""`dive-ds plan` arithmetic: parameter counts equal the real model's, bytes by hand."""

import pytest
import torch

from dive_ds.cli import main
from dive_ds.models.moe import DiveMoeConfig, DiveMoeForCausalLM
from dive_ds.plan import PassPlanConfig, PlanConfig, plan, plan_passes

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


def test_param_counts_with_a_shared_expert_match_the_model():
    """--shared-ratio 0.25 at r = 0.5: a shared expert of 12 channels, routed experts of 24 - 12; total, activated
    and experts-stage trainable (LoRA r = 8 on the shared expert too) equal the model's own counts."""
    from dive_ds.models.lora import experts_stage_trainable
    from dive_ds.models.moe import count_parameters

    p = plan(TINY, PlanConfig(experts=4, top_k=1, prune_ratio=0.5, shared_ratio=0.25, nodes=1, gpus_per_node=4,
                              ep=2))  # fmt: skip
    config = DiveMoeConfig(**TINY, num_local_experts=4, num_experts_per_tok=1, expert_intermediate_size=12,
                           shared_expert_intermediate_size=12, expert_bias=True)  # fmt: skip
    torch.manual_seed(0)
    model = DiveMoeForCausalLM(config)
    assert p["params"]["expert_width"] == 12
    assert p["params"]["total"] == sum(x.numel() for x in model.parameters())
    assert p["params"]["activated"] == count_parameters(config)["activated"]
    assert p["params"]["trainable"] == experts_stage_trainable(config, lora_r=8)["trainable"]
    with pytest.raises(ValueError, match="--shared-ratio 0.5 needs --top-k 1 and s < 1 - r"):
        PlanConfig(experts=4, prune_ratio=0.5, shared_ratio=0.5, ep=4)


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


def test_streaming_passes_by_hand():
    # TINY: H 32, F 48, L 2, 4 heads x 8, 2 KV heads; N 4, k 2, r 0.5 -> F' 24; 3 domains x 5 windows x 8 tokens
    cfg = PlanConfig(experts=4, top_k=2, prune_ratio=0.5, nodes=2, gpus_per_node=2, ep=2)
    p = PassPlanConfig(domains=3, windows_per_domain=5, seq_len=8, fit_windows_per_domain=2,
                       eval_windows_per_domain=1, dtype="fp32", tflops=2e-9)  # fmt: skip
    r = plan_passes(TINY, cfg, p)
    attn = 2 * 32 * 32 + 2 * 32 * 16  # q, o: 32 x 32; k, v: 32 x 16 -> 3072
    assert attn == 3072
    core = 4 * 2 * 8 * 32  # attention itself, per token: 2048
    c = r["calibrate"]
    assert c["tokens"] == 3 * 5 * 8 == 120
    # dense decoder layers: 2 x (3072 + 3 x 32 x 48 = 4608) = 15360 params per token
    assert c["flops"] == 120 * (2 * 15360 + core) == 120 * 32768
    assert c["windows_per_rank"] == 4  # 15 windows over 4 ranks
    assert c["hidden_bytes_per_rank"] == 4 * 8 * 32 * 4
    assert c["layer_weight_bytes"] == (3072 + 4608 + 64) * 4
    assert c["weight_bytes_read_per_rank"] == 2 * 7744 * 4 + 97 * 32 * 4
    # count 3 + sum, sum of squares 2 x 3 x 2 x 48 + MLP-input sum 3 x 2 x 32 + 2 column norms 2 x 2 x 48
    assert c["stats_bytes"] == 8 * (3 + 576 + 192 + 192)
    assert c["seconds"] == pytest.approx(120 * 32768 / (4 * 2000.0))
    fit = r["fit_router"]
    # gate+up 2 x 32 x 48 + 4 experts x 32 x 24 removed channels + 2 routed experts x 3 x 32 x 24
    per_layer = 3072 + 3072 + 3072 + 4608
    assert fit["tokens"] == 3 * 2 * 8 and fit["windows_per_rank"] == 2
    assert fit["flops"] == 48 * (2 * 2 * per_layer + core)
    ev = r["evaluate"]
    # router 4 x 32 + 2 routed experts per layer, then the head 97 x 32
    assert ev["tokens"] == 24
    assert ev["flops"] == 24 * (2 * (2 * (3072 + 128 + 4608) + 97 * 32) + core)
    bf16 = plan_passes(TINY, cfg, PassPlanConfig(domains=3, windows_per_domain=5, seq_len=8, dtype="bf16"))
    assert bf16["calibrate"]["hidden_bytes_per_rank"] == c["hidden_bytes_per_rank"] // 2
    assert bf16["fit_router"]["tokens"] == 120  # default: every calibration window


def test_plan_cli_prints_the_passes(capsys):
    assert main(["plan", "--model", "llama2-70b", "--nodes", "4", "--domains", "7", "--windows-per-domain",
                 "1024", "--calib-seq-len", "1024", "--tflops", "400"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "7 domains x 1024 windows x 1024 = 7,340,032 tokens" in out
    assert "per rank: 224 windows, hidden states 3.76 GB" in out
    assert main(["plan", "--model", "llama2-70b", "--dtype", "fp16"]) == 2


def test_phase_memory_by_hand(capsys):
    # TINY (H 32, F 48, L 2, V 97, untied), N 4, k 1, r 0.5 -> F' 24; 4 ranks (2 nodes x 2, EP 2); bf16
    from dive_ds.plan_memory import PHASES, cpu_rank, phase_memory

    cfg = PlanConfig(experts=4, top_k=1, prune_ratio=0.5, nodes=2, gpus_per_node=2, ep=2)
    p = PassPlanConfig(domains=3, windows_per_domain=5, seq_len=8, fit_windows_per_domain=2,
                       eval_windows_per_domain=1, dtype="bf16")  # fmt: skip
    pm = phase_memory(TINY, cfg, p)
    assert tuple(pm) == PHASES
    attn = 3072
    dense = attn + 3 * 32 * 48 + 2 * 32  # 7744 parameters
    moe = attn + 2 * 32 + 4 * (3 * 32 * 24 + 32) + 2 * 4 * 32  # 12800
    act = 8 * 8 * (3 * 48 + 8 * 32) * 4  # 102,400 bytes
    logits = 3 * 8 * 8 * 97 * 4
    head = 97 * 32 * 2
    stats = 8 * (3 + 2 * 3 * 2 * 48 + 3 * 2 * 32 + 2 * 2 * 48)
    # calibration: ceil(15 / 4) = 4 windows per rank; the layer read (mmap + clone), on the device the layer,
    # the working set, the carried states and the float64 statistics
    assert pm["calibration"]["host"] == 2 * dense * 2
    assert pm["calibration"]["device"] == dense * 2 + act + 4 * 8 * 32 * 2 + stats
    # mining: 3 streams of ceil(3 / 4) = 1 window; the layer + one pruned MLP, or the head and logits
    assert pm["mining"]["device"] == 3 * 8 * 32 * 2 + max(dense * 2 + 3 * 32 * 24 * 2 + act, head + logits)
    # evaluation: 2 streams (router, oracle); the retrained model is read as stored, in float32
    assert pm["evaluation"]["host"] == 2 * moe * 4
    assert pm["evaluation"]["device"] == 2 * 8 * 32 * 2 + max(moe * 2 + act, head + logits)
    # on a CPU-only rank: the carried states plus the largest of the read, the layer's compute and the head
    assert cpu_rank(pm)["evaluation"] == 2 * 8 * 32 * 2 + max(2 * moe * 4, moe * 4 + act, head + logits)
    # reconstruction: a node writes the experts of its 2 GPUs' EP ranks: all 4
    assert pm["reconstruction"]["host"] == max(2 * dense * 2 + 2 * moe * 2, 2 * 97 * 32 * 2 * 2)
    # router fit: ceil(6 / 4) = 2 windows = 16 tokens per rank, (4H + E) float32 each, 16 bytes per token of all
    assert pm["router_fit"]["device"] == moe * 2 + 3 * 32 * 48 * 2 + act + 16 * (4 * 32 + 4) * 4 + 16 * 48
    assert pm["router_fit"]["host"] == moe * (2 * 2 + 4) + 3 * 32 * 48 * (2 * 2 + 4 + 4)
    assert cpu_rank(pm)["consolidation"] == max(3 * moe * 4, 3 * 97 * 32 * 2 * 4)
    assert main(["plan", "--model", "llama2-70b", "--nodes", "4", "--ep", "8"]) == 0
    out = capsys.readouterr().out
    assert "peak memory per rank, by phase (the whole dense model: 138.0 GB)" in out
    assert all(f"  {phase:<15}" in out for phase in PHASES)
