"""Peak memory per rank of every phase of the pipeline (pure arithmetic, printed by `dive-ds plan`).

Every phase streams: no rank holds the whole model. What a rank holds at its peak, in bytes, from the code
(b = bytes per element of the pass dtype; the checkpoint is assumed stored in it; B = 8 windows per forward,
S tokens per window, H hidden, F dense FFN width, F' expert width, E experts, k top-k, V vocabulary, D domains;
w = this rank's windows = ceil(D x windows per domain / world)):

- reading a layer (host): its tensors are memory-mapped while read and cloned into private memory, so
  2 x the layer's bytes at the peak; the router fit builds its MoE layer and dense MLP in float32 first
  (+ 4 bytes per parameter when b < 4) and permutes the MLP's channels (+ 4 bytes per MLP parameter);
- dense layer = attention + 3 H F + 2 H parameters; MoE layer = attention + 2 H + E (3 H F' + H) + 2 E H;
- a forward's working set: B S (3 F + 8 H) x 4 bytes (as calibration reserves);
- logits: B S V x 4 bytes, three times (logits, log-softmax, per-token NLL);
- carried hidden states: w S H b per stream (evaluation of a MoE: 2 streams, router and oracle routing;
  mining: D streams, one per pruned model; the router fit carries hidden, residual and MLP input in float32
  and E errors per token, and copies the fit tokens' inputs once: w S (4 H + E) x 4, plus 16 bytes per token
  of all ranks gathered for the medians);
- the retrained model that evaluation and consolidation read is stored in float32 (the trainer's export);
- calibration's float64 statistics: 8 (D + 2 D L F + D L H + 2 L F);
- writers (reconstruction, consolidation): a layer's output tensors plus their serialised copy (2 x).

"device" is what sits on the compute device of a GPU rank (the resident layer, the working set, the carried
states when they fit); "host" is what the reads and writers need beside it. "cpu" is a CPU-only rank's peak
(`cpu_rank`): there the resident layer is the host copy itself, and the read, the layer's compute and the
head come one after the other. Not counted: the interpreter and libraries (~0.5 GB after imports) and the
allocator's slack; tests/parallel/test_memory.py measures every phase on 2 ranks against this.
"""

from __future__ import annotations

import math

from dive_ds.plan import DTYPE_BYTES, PassPlanConfig, PlanConfig, attention_params

PHASES = ("calibration", "mining", "reconstruction", "router_fit", "evaluation", "consolidation")
BATCH = 8


def phase_memory(model_cfg: dict, cfg: PlanConfig, p: PassPlanConfig) -> dict[str, dict[str, int]]:
    """{phase: {"host", "device", "cpu": bytes}} at the peak of one rank (formulas: module docstring)."""
    h, f, n_layers = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["num_hidden_layers"]
    vocab, tied = model_cfg["vocab_size"], model_cfg.get("tie_word_embeddings", False)
    width = max(1, round(f * (1 - cfg.prune_ratio)))
    e, s, d = cfg.experts, p.seq_len, p.domains
    b = DTYPE_BYTES[p.dtype]
    world = cfg.nodes * cfg.gpus_per_node
    attn = attention_params(model_cfg)
    dense = attn + 3 * h * f + 2 * h
    moe = attn + 2 * h + e * (3 * h * width + h) + 2 * e * h
    fp32_build = 4 if b < 4 else 0  # a MoE layer is built in float32 before it moves to the pass dtype
    act = BATCH * s * (3 * f + 8 * h) * 4
    logits = 3 * BATCH * s * vocab * 4
    head = vocab * h * b  # the output matrix (or the embedding, read again when tied)

    def rank_windows(per_domain: int) -> int:
        return math.ceil(d * per_domain / world)

    def carried(per_domain: int, streams: int = 1) -> int:
        return streams * rank_windows(per_domain) * s * h * b

    stats = 8 * (d + 2 * d * n_layers * f + d * n_layers * h + 2 * n_layers * f)
    calibration = {
        "host": 2 * dense * b,
        "device": dense * b + act + carried(p.windows_per_domain) + stats,
    }
    mining = {
        "host": 2 * dense * b,
        "device": carried(p.eval_windows_per_domain, d)
        + max(dense * b + 3 * h * width * b + act, head + logits),
    }
    # a node writes the experts of its ranks: E/P per expert-parallel rank, its GPUs' distinct EP ranks
    node_experts = min(e, e // cfg.ep * cfg.gpus_per_node)
    node_layer = attn + 2 * h + node_experts * (3 * h * width + h) + 2 * e * h
    embed_out = vocab * h * b * (1 if tied else 2)
    reconstruction = {"host": max(2 * dense * b + 2 * node_layer * b, 2 * embed_out), "device": 0}
    fit_tokens = rank_windows(p.fit_windows) * s
    router_fit = {  # the MoE layer and the dense MLP built in float32 on the host (the MLP permuted too)
        "host": moe * (2 * b + fp32_build) + 3 * h * f * (2 * b + fp32_build + 4),
        "device": moe * b + 3 * h * f * b + act
        + fit_tokens * (4 * h + e) * 4 + 16 * d * p.fit_windows * s,
    }  # fmt: skip
    streams = 2  # router and oracle routing
    # the retrained model is written in float32 (the trainer's export): evaluation and consolidation read that
    evaluation = {
        "host": 2 * moe * 4,
        "device": carried(p.eval_windows_per_domain, streams) + max(moe * b + act, head + logits),
    }
    consolidation = {"host": max(3 * moe * 4, 3 * embed_out // b * 4), "device": 0}
    # a CPU-only rank (the pass in float32): the resident layer is the host copy itself, and the reads, the
    # layer's compute and the head's come one after the other
    rows = fit_tokens * (4 * h + e) * 4 + 16 * d * p.fit_windows * s
    calibration["cpu"] = carried(p.windows_per_domain) + stats + max(2 * dense * b, dense * b + act)
    mining["cpu"] = carried(p.eval_windows_per_domain, d) + max(
        2 * dense * b, dense * b + 3 * h * width * b + act, head + logits
    )
    router_fit["cpu"] = rows + max(2 * moe * b + 2 * 3 * h * f * b, moe * b + 3 * h * f * (b + 4) + act)
    evaluation["cpu"] = carried(p.eval_windows_per_domain, streams) + max(
        2 * moe * 4, moe * 4 + act, head + logits
    )
    reconstruction["cpu"], consolidation["cpu"] = reconstruction["host"], consolidation["host"]
    return {
        "calibration": calibration,
        "mining": mining,
        "reconstruction": reconstruction,
        "router_fit": router_fit,
        "evaluation": evaluation,
        "consolidation": consolidation,
    }


def dense_bytes(model_cfg: dict, p: PassPlanConfig) -> int:
    """The whole dense model's weights in the pass dtype."""
    h, f = model_cfg["hidden_size"], model_cfg["intermediate_size"]
    layer = attention_params(model_cfg) + 3 * h * f + 2 * h
    tied = model_cfg.get("tie_word_embeddings", False)
    params = model_cfg["num_hidden_layers"] * layer + model_cfg["vocab_size"] * h * (1 if tied else 2) + h
    return params * DTYPE_BYTES[p.dtype]


def cpu_rank(pm: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per phase, the memory of a rank that computes on its CPU (device and host are one memory)."""
    return {phase: m["cpu"] for phase, m in pm.items()}


def format_phase_memory(pm: dict[str, dict[str, int]], model_bytes: int) -> str:
    """The `dive-ds plan` table: peak memory per rank and phase, beside the whole model's size."""
    gb = 1e9
    lines = [f"peak memory per rank, by phase (the whole dense model: {model_bytes / gb:.1f} GB):",
             f"  {'phase':<15} {'GPU rank: device':>17} {'host':>9}   {'CPU-only rank':>13}"]  # fmt: skip
    for phase, m in pm.items():
        lines.append(
            f"  {phase:<15} {m['device'] / gb:>14.2f} GB {m['host'] / gb:>6.2f} GB   "
            f"{m['cpu'] / gb:>10.2f} GB"
        )
    return "\n".join(lines)
