"""Retraining step time with and without expert parallelism, measured in one run.

    .venv/bin/python benchmarks/ep_step_time.py --model runs/demo/moe-dive [--steps 4] [--seq-len 256]

Runs the experts stage (LoRA + routers + norms, sparse top-k) for --steps steps of a global batch of
--batch sequences, three ways, one after the other on this machine:
  1 rank,  ZeRO-3, no expert parallelism      (python launchers/retrain.py)
  2 ranks, ZeRO-3, expert parallelism 2       (torchrun --nproc_per_node 2)
  2 ranks, ZeRO-2, expert parallelism 2       (deepspeed --num_gpus 2)
and prints the median step time (first step dropped), tokens/s and the ratios to the 1-rank run.
On a CPU every rank runs with OMP_NUM_THREADS=1, so 2 ranks use 2 cores against 1.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _ds(base: str, ep: int | None, out: Path) -> Path:
    ds = json.loads((REPO / "ds_configs" / base).read_text())
    ds.pop("expert_parallel", None)
    if ep:
        ds["expert_parallel"] = {"enabled": True, "autoep_size": ep}
    out.write_text(json.dumps(ds))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/moe-dive", help="a dive_moe folder (make demo makes one)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=256)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ep_bench_"))
    run = {
        "model": {"path": str(Path(a.model).resolve())},
        "data": {"registry": "demo", "seq_len": a.seq_len},
        "train": {"global_batch_size": a.batch},
        "stages": {"router": {"enabled": False, "steps": 1}, "experts": {"steps": a.steps, "lr": 1e-4}},
        "checkpoint": {"every": 0, "keep": 1},
        "eval": {"every": 0, "at_start": False, "windows_per_domain": 1, "batch_size": 1},
        "logging": {"every": 1, "heatmap_every": 0, "progress": False},
    }
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "launchers" / "retrain.py")
    runs = {
        "1 rank, ZeRO-3, no EP": ([sys.executable, script], _ds("zero3.json", None, root / "z3.json")),
        "2 ranks, ZeRO-3, EP 2": (
            [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _port(), script],
            _ds("zero3.json", 2, root / "z3ep.json"),
        ),
        "2 ranks, ZeRO-2, EP 2": (
            [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", _port(), script],
            _ds("zero2.json", 2, root / "z2ep.json"),
        ),
    }
    results = {}
    for i, (name, (cmd, ds)) in enumerate(runs.items()):
        out = root / f"run{i}"
        cfg = root / f"run{i}.yaml"
        cfg.write_text(yaml.safe_dump(run | {"out_dir": str(out)}))
        proc = subprocess.run(
            cmd + ["--deepspeed", str(ds), "--config", str(cfg)], env=env, capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in rows if "event" not in r][1:]
        results[name] = statistics.median(times)
    base = next(iter(results.values()))
    tokens = a.batch * a.seq_len
    print(
        f"experts stage of {a.model}, {a.batch} x {a.seq_len} tokens per step, median of {a.steps - 1} steps"
    )
    for name, t in results.items():
        print(f"  {name:24s} {t:7.2f} s/step  {tokens / t:8.1f} tok/s  x{base / t:.2f} vs 1 rank")


if __name__ == "__main__":
    main()
