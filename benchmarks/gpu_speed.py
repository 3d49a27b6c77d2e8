"""Issue 22's GPU numbers in one run: the calibration pass in bf16 against a plain forward, the MoE layer's
TFLOP/s against the GPU's measured bf16 matmul rate, and the router fit's tokens/s against the pass's.

    python benchmarks/gpu_speed.py --out /tmp/gpu_speed            # a 1.1B Llama (TinyLlama's shape)
    python benchmarks/gpu_speed.py --out /tmp/x --hidden 64 --ffn 128 --layers 2 --heads 4 --kv-heads 2 \
        --vocab 128 --windows 4 --seq-len 32 --device cpu --dtype fp32   # a smoke run anywhere

A random Llama of the given sizes is written to --out (speed does not depend on the weights), with
--domains random-token domains (each favours its own slice of the vocabulary, so the domains differ):
1. the bf16 matmul rate of this GPU (8192^3, mean of 10 after 3 warm-ups): the peak used below;
2. a plain forward of the whole dense model (benchmarks/calibration_speed.plain_forward) against the
   streaming calibration pass (`streaming_stats`, one layer resident, layer loading included), same tokens;
3. a DIVE MoE reconstructed from that calibration (`run_reconstruct`, one expert per domain, r = 0.5,
   top-1), then `fit_routers` on the same windows (tokens/s against the pass's);
4. one MoE block of it (layer 0) forward and forward + backward on --layer-tokens rows: TFLOP/s of the
   expert matmuls (6 x rows x top_k x H x W per forward, 3x that with backward) against the peak of 1, and
   the same for a dense SwiGLU MLP of the activated width W.
Prints each number and writes them to --out/gpu_speed.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_speed import _sync, plain_forward  # noqa: E402


def _timed(fn, device, reps: int = 10, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def matmul_tflops(device, dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _timed(lambda: a @ b, device) / 1e12


def write_dense(folder: Path, a, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                         max_position_embeddings=max(2048, a.seq_len), tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return config


def write_calibration_folder(folder: Path, model_dir: Path, stats, windows: dict, info: dict) -> None:
    from transformers import AutoConfig

    from dive_ds.build.outputs import run_manifest_base
    from dive_ds.data.sampler import DomainSamples
    from dive_ds.io.calibration import write_calibration
    from dive_ds.io.loading import LayerwiseCheckpoint, model_fingerprint

    samples = {n: DomainSamples(calib=w, eval=w[:1].clone(), calib_pool_tokens=w.numel(), documents=1)
               for n, w in windows.items()}  # fmt: skip
    config = AutoConfig.from_pretrained(model_dir)
    manifest = run_manifest_base("calibration") | {
        "identity": {"benchmark": "gpu_speed"},
        "model": {"path": str(model_dir), "fingerprint": model_fingerprint(config, LayerwiseCheckpoint(model_dir))},
        "domains": [{"name": n, "family": n, "documents": 1, "calib_pool_tokens": w.numel(),
                     "calib_tokens": w.numel(), "eval_tokens": w[:1].numel()} for n, w in windows.items()],
        "pass": info | {"sampling_seconds": 0.0},
    }  # fmt: skip
    write_calibration(folder, stats, samples, manifest)


def mlp_rates(moe_dir: Path, rows: int, device, dtype, peak: float) -> dict:
    """TFLOP/s of layer 0's MoE block and of a dense SwiGLU MLP of the activated width, fwd and fwd+bwd."""
    import torch.nn.functional as F

    from dive_ds.io.layers import MoeLayers, build_moe_layer

    moe = MoeLayers(moe_dir)
    cfg = moe.config
    block = build_moe_layer(cfg, 0, moe.layer_state(0)).to(device, dtype)
    mlp = block.mlp
    mlp.gate.mode = "sparse"
    h, w, k = cfg.hidden_size, cfg.expert_intermediate_size, cfg.num_experts_per_tok
    x = torch.randn(1, rows, h, device=device, dtype=dtype)
    dense = [torch.randn(n, m, device=device, dtype=dtype) * 0.02 for n, m in ((w, h), (w, h), (h, w))]
    for p in dense:
        p.requires_grad_(True)

    def dense_mlp(x):
        return F.linear(F.silu(F.linear(x, dense[0])) * F.linear(x, dense[1]), dense[2])

    flops = 6 * rows * k * h * w
    out = {}

    def moe_mlp(x):
        return mlp(x)[0]

    xg = x.detach().clone().requires_grad_(True)
    for name, fn in (("moe", moe_mlp), ("dense", dense_mlp)):
        with torch.no_grad():
            t_f = _timed(lambda f=fn: f(x), device)
        t_fb = _timed(lambda f=fn: f(xg).float().square().mean().backward(), device, reps=5, warm=2)
        out[name] = {"forward_ms": round(t_f * 1e3, 3), "forward_tflops": round(flops / t_f / 1e12, 2),
                     "fwd_bwd_ms": round(t_fb * 1e3, 3), "fwd_bwd_tflops": round(3 * flops / t_fb / 1e12, 2)}  # fmt: skip
        out[name] |= {
            f"{s}_of_peak": round(out[name][f"{s}_tflops"] / peak, 3) for s in ("forward", "fwd_bwd")
        }
    out["rows"], out["experts"], out["top_k"], out["width"] = rows, cfg.num_local_experts, k, w
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--domains", type=int, default=8, help="random-token domains = experts (default 8)")
    p.add_argument("--windows", type=int, default=16, help="windows per domain (default 16)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layer-tokens", type=int, default=32768, help="rows for the MoE block's TFLOP/s")
    p.add_argument("--matmul", type=int, default=8192, help="size of the peak-rate matmul")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    a = p.parse_args()
    from dive_ds.build.calib_pass import CalibConfig, streaming_stats
    from dive_ds.build.expert_plan import reconstruct_config
    from dive_ds.build.reconstruct import run_reconstruct
    from dive_ds.build.router_config import RouterFitConfig
    from dive_ds.build.router_pass import fit_routers
    from dive_ds.parallel.ranks import Ranks

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "dtype": a.dtype, "torch": torch.__version__}  # fmt: skip
    peak = matmul_tflops(device, dtype, a.matmul)
    res["matmul_tflops"] = round(peak, 1)
    print(f"{res['device']}: {a.matmul}^3 {a.dtype} matmul {peak:.1f} TFLOP/s", flush=True)

    dense_dir = out / "dense"
    config = write_dense(dense_dir, a, device, dtype)
    g = torch.Generator().manual_seed(0)
    windows = {}
    for d in range(a.domains):
        lo = (d * a.vocab) // (2 * a.domains)  # each domain favours its own slice of the vocabulary
        windows[f"dom{d}"] = torch.randint(lo, lo + a.vocab // 2, (a.windows, a.seq_len), generator=g)
    ids = torch.cat(list(windows.values()))
    tokens = ids.numel()
    params = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    print(f"dense: {config.num_hidden_layers} layers, H {config.hidden_size}, F {config.intermediate_size}; "
          f"{tokens} tokens ({a.domains} domains x {a.windows} x {a.seq_len})", flush=True)  # fmt: skip

    with torch.no_grad():
        t_plain = plain_forward(dense_dir, ids, a.batch_size, device, dtype)
    t0 = time.perf_counter()
    stats, info = streaming_stats(dense_dir, windows, CalibConfig(batch_size=a.batch_size, progress=False),
                                  Ranks(device=device), dtype)  # fmt: skip
    t_cal = time.perf_counter() - t0
    res["plain_forward"] = {"seconds": round(t_plain, 2), "tokens_per_s": round(tokens / t_plain, 1)}
    res["calibration"] = {"seconds": round(t_cal, 2), "tokens_per_s": round(tokens / t_cal, 1),
                          "vs_plain": round(t_plain / t_cal, 3), "layer_load_seconds": info["layer_load_seconds"],
                          "compute_seconds": info["compute_seconds"]}  # fmt: skip
    print(f"plain forward {tokens / t_plain:,.0f} tokens/s; calibration pass {tokens / t_cal:,.0f} tokens/s "
          f"= {t_plain / t_cal:.3f}x the plain forward (layer loading {info['layer_load_seconds']} s)", flush=True)  # fmt: skip

    calib_dir, moe_dir = out / "calib", out / "moe"
    write_calibration_folder(calib_dir, dense_dir, stats, windows, info)
    groups = out / "groups.json"
    groups.write_text(json.dumps({f"g{d}": [f"dom{d}"] for d in range(a.domains)}))
    t0 = time.perf_counter()
    run_reconstruct(calib_dir, groups, moe_dir, reconstruct_config(method="dive", experts=a.domains, top_k=1,
                                                                     prune_ratio=0.5))  # fmt: skip
    res["reconstruct_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    _, rep = fit_routers(
        moe_dir, dense_dir, windows, RouterFitConfig(progress=False), Ranks(device=device), dtype
    )
    t_fit = time.perf_counter() - t0
    res["router_fit"] = {"seconds": round(t_fit, 2), "tokens_per_s": round(tokens / t_fit, 1),
                         "vs_calibration": round(t_fit / t_cal, 3), "lbfgs_seconds": rep["fit_seconds"],
                         "heldout_label_accuracy": rep["mean_label_accuracy_heldout"],
                         "carried_on": rep["carried_on"]}  # fmt: skip
    print(f"router fit {tokens / t_fit:,.0f} tokens/s = {t_fit / t_cal:.2f}x the calibration pass's time "
          f"(L-BFGS {rep['fit_seconds']} s; held-out label accuracy {rep['mean_label_accuracy_heldout']})", flush=True)  # fmt: skip

    res["mlp"] = mlp_rates(moe_dir, a.layer_tokens, device, dtype, peak)
    for name in ("moe", "dense"):
        r = res["mlp"][name]
        print(f"{name} MLP, {a.layer_tokens} rows: forward {r['forward_tflops']} TFLOP/s ({r['forward_of_peak']:.1%} "
              f"of the matmul rate), forward + backward {r['fwd_bwd_tflops']} ({r['fwd_bwd_of_peak']:.1%})", flush=True)  # fmt: skip
    res["sizes"] = {k: getattr(a, k) for k in ("hidden", "ffn", "layers", "domains", "windows", "seq_len")}
    res["dense_ffn_params"] = params
    (out / "gpu_speed.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
