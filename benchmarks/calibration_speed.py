"""The calibration pass against a plain Hugging Face forward of the dense model, on the same device,
precision, batch size and tokens, measured in one run.

    python benchmarks/calibration_speed.py --model demo --windows 16 --seq-len 256 --device cpu
    python benchmarks/calibration_speed.py --model /models/llama-70b --windows 64 --seq-len 1024 \
        --device cuda --dtype bf16 --peak-tflops 989

(a) plain: the whole base model resident (`model.model(...)`, no logits), no_grad, timed after one
warm-up batch; (b) the streaming calibration pass (`streaming_stats`), one layer resident, carried
hidden states, statistics hooks, layer loading from safetensors included. The tokens are random ids
(speed does not depend on the text). Goal: (b) runs at >= 0.9x the tokens/s of (a).
"""

import argparse
import time

import torch

from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from dive_ds.io.loading import local_snapshot, resolve_model
from dive_ds.parallel.ranks import DTYPES, Ranks, resolve_device, resolve_dtype


def flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per weight of the decoder layers, plus causal attention scores and
    mixing (2 * seq_len * head dims per layer, half of the full square)."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    head_dim = getattr(config, "head_dim", None) or h // heads
    layer_weights = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * f
    return n * (2 * layer_weights + 2 * seq_len * heads * head_dim)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_forward(model_dir, ids: torch.Tensor, batch_size: int, device, dtype) -> float:
    """Seconds for model.model over all windows, the whole model resident (after one warm-up batch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    base = model.model.to(device).eval()
    base(input_ids=ids[:batch_size].to(device))
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, ids.shape[0], batch_size):
        base(input_ids=ids[i : i + batch_size].to(device))
    _sync(device)
    seconds = time.perf_counter() - t0
    del model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    from transformers import AutoConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="demo", help="dense model folder or hub id (default: demo, SmolLM2-135M)"
    )
    p.add_argument("--windows", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward call (default 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense peak (default 989: H100/H200 bf16)"
    )
    a = p.parse_args()
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    model_dir = local_snapshot(resolve_model(a.model))
    config = AutoConfig.from_pretrained(model_dir)
    ids = torch.randint(
        0, config.vocab_size, (a.windows, a.seq_len), generator=torch.Generator().manual_seed(0)
    )
    tokens = ids.numel()
    print(
        f"{a.model}: {tokens} tokens ({a.windows} x {a.seq_len}), batch {a.batch_size}, {device}, {a.dtype}"
    )

    t_plain = plain_forward(model_dir, ids, a.batch_size, device, dtype)
    t0 = time.perf_counter()
    _, info = streaming_stats(
        model_dir,
        {"bench": ids},
        CalibConfig(batch_size=a.batch_size, progress=False),
        Ranks(device=device),
        dtype,
    )
    t_cal = time.perf_counter() - t0
    rows = [("plain HF forward (a)", t_plain), ("calibration pass (b)", t_cal)]
    for name, sec in rows:
        line = f"{name}: {sec:8.2f} s  {tokens / sec:10.1f} tokens/s"
        if device.type == "cuda":
            tflops = flops_per_token(config, a.seq_len) * tokens / sec / 1e12
            line += f"  {tflops:7.1f} TFLOP/s ({tflops / a.peak_tflops:.1%} of {a.peak_tflops:g})"
        print(line)
    print(
        f"  (b) of which layer loading {info['layer_load_seconds']} s, compute {info['compute_seconds']} s; "
        f"hidden states on {info['hidden_states_on']}"
    )
    print(f"ratio (b)/(a) tokens/s: {t_plain / t_cal:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
