"""Subprocess probe for the memory tests: peak RSS growth of one step over the post-import baseline.

usage: python -m tests.memprobe {calibrate|reconstruct|full-load} MODEL_DIR [CALIB_DIR OUT_DIR]
prints one JSON line: {"baseline_mb": ..., "peak_mb": ..., "delta_mb": ...}
"""

import json
import sys

import psutil
import torch

import dive_ds  # noqa: F401  (imports transformers, registers the MoE model)
from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from dive_ds.build.expert_plan import ReconstructConfig, plan_experts
from dive_ds.build.moe_writer import write_moe
from dive_ds.io.calibration import load_calibration


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image. (ru_maxrss would not do: Linux carries it across exec,
    so a child of a large pytest process would report the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    what, model_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    base = psutil.Process().memory_info().rss / 2**20
    if what == "calibrate":
        g = torch.Generator().manual_seed(0)
        streaming_stats(
            model_dir,
            {
                "a": torch.randint(0, 256, (4, 32), generator=g),
                "b": torch.randint(0, 256, (4, 32), generator=g),
            },
            CalibConfig(progress=False),
        )
    elif what == "reconstruct":
        cal = load_calibration(sys.argv[3])
        cfg = ReconstructConfig(num_experts=4, top_k=1, prune_ratio=0.5, method="random-halves")
        write_moe(model_dir, plan_experts(cal.stats, cal.domains, None, cfg), cfg, sys.argv[4])
    elif what == "full-load":
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            m(torch.randint(0, 256, (8, 32)))
    peak = _vm_hwm_mb()
    print(
        json.dumps(
            {"baseline_mb": round(base, 1), "peak_mb": round(peak, 1), "delta_mb": round(peak - base, 1)}
        )
    )


if __name__ == "__main__":
    main()
