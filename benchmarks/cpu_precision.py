"""fp32 against bf16 on this CPU, measured in one run: the demo's matmul shapes, then (with --model) the
streamed evaluation of one model, timed and scored both ways.

    python benchmarks/cpu_precision.py
    python benchmarks/cpu_precision.py --model runs/demo/moe-clusters-fitted --registry runs/demo/eval_registry.json

bf16 is only worth it where the CPU multiplies it natively (flags avx512_bf16 / amx_bf16, which the script
reports); elsewhere PyTorch emulates it, slower than float32. Prints GFLOP/s per shape and precision with the
bf16 / fp32 ratio, and for the model each evaluation's seconds and mean perplexity with their ratios.
"""

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from dive_ds.parallel.ranks import cpu_has_native_bf16

SHAPES = {  # (rows, in, out): 8 windows of 256 tokens through the demo model's linear layers
    "gate/up, dense FFN": (2048, 576, 1536),
    "down, dense FFN": (2048, 1536, 576),
    "gate/up, half-width expert": (2048, 576, 768),
    "q/o projection": (2048, 576, 576),
    "output head": (2048, 576, 49152),
}


def gflops(rows: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    for _ in range(3):
        F.linear(x, w)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        F.linear(x, w)
        reps += 1
    return 2 * rows * k * n * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a dense or dive_moe folder to evaluate in fp32 and in bf16")
    p.add_argument("--registry", help="the domains to evaluate it on (e.g. runs/demo/eval_registry.json)")
    p.add_argument("--eval-windows", type=int, default=4)
    a = p.parse_args()
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; {torch.get_num_threads()} thread(s)")
    for name, (m, k, n) in SHAPES.items():
        f32, b16 = gflops(m, k, n, torch.float32), gflops(m, k, n, torch.bfloat16)
        print(
            f"{name:<28} {m}x{k} @ {k}x{n}: fp32 {f32:6.0f} GFLOP/s, bf16 {b16:6.0f} GFLOP/s, bf16/fp32 {b16 / f32:.2f}x"
        )
    if not a.model:
        return
    from dive_ds.build.evaluate import run_evaluate

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "bf16"):
            t0 = time.time()
            r = run_evaluate(a.model, None, f"{tmp}/{dtype}", oracle=False, router=True, registry=a.registry,
                             eval_windows=a.eval_windows, device="cpu", dtype=dtype)  # fmt: skip
            res[dtype] = (time.time() - t0, r["router_mean"])
            print(
                f"evaluate {a.model} in {dtype}: {res[dtype][0]:.1f} s, mean perplexity {res[dtype][1]:.3f}"
            )
    (t32, p32), (t16, p16) = res["fp32"], res["bf16"]
    print(f"bf16 / fp32: time {t16 / t32:.2f}x, mean perplexity {p16 / p32:.5f}x")


if __name__ == "__main__":
    main()
