"""Router fitting's cost against the calibration pass, on the same tokens, measured in one run.

    python benchmarks/router_fit_cost.py --calib runs/demo/calib --moe runs/demo/moe-dive --windows 4

Runs the calibration pass (dense model, statistics) and `fit-router` (MoE carried, dense targets,
one regression per layer) over the same calibration windows and prints both throughputs and
their ratio, plus the split of the fit's time between the streaming forward and the regression.
"""

import argparse
import time
from dataclasses import replace

from dive_ds.calibrate import CalibConfig, load_calibration, streaming_stats
from dive_ds.routerfit import RouterFitConfig, fit_routers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", required=True)
    p.add_argument("--moe", required=True, help="a dive_moe folder reconstructed from that calibration")
    p.add_argument("--windows", type=int, default=4, help="calibration windows per domain (default 4)")
    a = p.parse_args()
    cal = load_calibration(a.calib)
    windows = {n: w[: a.windows] for n, w in cal.calib.items()}
    dense = cal.manifest["model"]["path"]
    tokens = sum(w.numel() for w in windows.values())
    t0 = time.perf_counter()
    streaming_stats(dense, windows, CalibConfig(progress=False))
    t_cal = time.perf_counter() - t0
    cfg = RouterFitConfig(progress=False)
    t0 = time.perf_counter()
    _, rep = fit_routers(a.moe, dense, windows, cfg)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, rep1 = fit_routers(a.moe, dense, windows, replace(cfg, max_iter=1))
    t_fwd = time.perf_counter() - t0
    print(f"{tokens} tokens x {rep['layers'][-1]['layer'] + 1} layers")
    print(f"calibration pass : {t_cal:8.1f} s  {tokens / t_cal:8.1f} tokens/s")
    print(
        f"fit-router       : {t_fit:8.1f} s  {tokens / t_fit:8.1f} tokens/s  ({t_fit / t_cal:.2f}x the calibration pass)"
    )
    print(
        f"  of which forward (fit with 1 L-BFGS iteration): {t_fwd:.1f} s; regression: {t_fit - t_fwd:.1f} s"
    )


if __name__ == "__main__":
    main()
