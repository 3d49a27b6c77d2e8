"""Router fitting's cost against the calibration pass, on the same tokens, measured in one run.

    python benchmarks/router_fit_cost.py --calib runs/demo/calib --moe runs/demo/moe-dive --windows 8

Runs, over the same calibration windows:
- the calibration pass (dense model, statistics);
- `fit-router` as it is (each sliced expert's error from one gather + matmul, L-BFGS to the gradient tolerance);
- the same with a looser tolerance (3e-3: fewer L-BFGS evaluations, a different fit) and with 200
  L-BFGS iterations (tolerance ~0);
- the fit with one L-BFGS iteration (its streaming forward alone).
Prints each throughput, the ratios to the calibration pass, and each fit's held-out label accuracy
and excess error (the fits must agree on those).
"""

import argparse
import time
from dataclasses import replace

from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from dive_ds.build.router_config import RouterFitConfig
from dive_ds.build.router_pass import fit_routers
from dive_ds.io.calibration import load_calibration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True)
    p.add_argument("--moe", required=True, help="a dive_moe folder reconstructed from that calibration")
    p.add_argument(
        "--windows", type=int, default=8, help="calibration windows per domain (default 8, as the demo)"
    )
    p.add_argument("--variants", default="now,loose,200,forward",
                   help="comma list of now, loose (3e-3), 200 (iterations), forward (default all)")  # fmt: skip
    a = p.parse_args()
    cal = load_calibration(a.calib)
    windows = {n: w[: a.windows] for n, w in cal.calib.items()}
    dense = cal.manifest["model"]["path"]
    tokens = sum(w.numel() for w in windows.values())
    t0 = time.perf_counter()
    streaming_stats(dense, windows, CalibConfig(progress=False))
    t_cal = time.perf_counter() - t0
    now = RouterFitConfig(progress=False)
    runs = {
        "now": ("fit-router (now)", now),
        "loose": ("fit-router, tolerance 3e-3 (stops sooner)", replace(now, tolerance=3e-3)),
        "200": ("fit-router, 200 L-BFGS iterations", replace(now, tolerance=1e-30)),
        "forward": ("streaming forward only (1 L-BFGS iteration)", replace(now, max_iter=1)),
    }
    picked = a.variants.split(",")
    if unknown := set(picked) - set(runs):
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(runs)}")
    runs = dict(runs[k] for k in picked)
    print(f"{tokens} tokens; "
          f"calibration pass: {t_cal:.1f} s, {tokens / t_cal:.1f} tokens/s")  # fmt: skip
    for name, cfg in runs.items():
        t0 = time.perf_counter()
        _, rep = fit_routers(a.moe, dense, windows, cfg)
        t = time.perf_counter() - t0
        print(
            f"{name:<56}: {t:6.1f} s {tokens / t:7.1f} tokens/s = {t / t_cal:.2f}x the calibration pass; "
            f"L-BFGS {rep['fit_seconds']:.1f} s; held-out label accuracy {rep['mean_label_accuracy_heldout']:.4f}, "
            f"excess error {rep['mean_excess_error_heldout']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
