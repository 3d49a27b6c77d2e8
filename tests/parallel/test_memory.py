"""Streaming keeps about one decoder layer resident: peak RSS against the model's size.

Each step runs in a fresh subprocess (tests/fixtures/memprobe.py) and reports its peak RSS growth
over the RSS right after imports.
"""

import json
import subprocess
import sys

import pytest

from tests.fixtures.tiny import make_tiny_calibration

# 32 layers x (4 x 512^2 attention + 3 x 512 x 2048 FFN) ~ 134M params ~ 540 MB in fp32: large enough
# that the fixed overhead of a forward (lazy imports, kernels, ~60 MB) is small against it
BIG = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=32,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=256,
)


def _probe(*args) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.memprobe", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    model_dir, calib_dir = make_tiny_calibration(root, n_domains=2, windows=2, seq_len=16, n_eval=1, **BIG)
    return root, model_dir, calib_dir


@pytest.mark.heavy
def test_streaming_peak_memory(big):
    root, model_dir, calib_dir = big
    model_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    full = _probe("full-load", model_dir)
    cal = _probe("calibrate", model_dir)
    rec = _probe("reconstruct", model_dir, calib_dir, root / "moe")
    moe_mb = sum(f.stat().st_size for f in (root / "moe").glob("*.safetensors")) / 2**20
    print(
        f"\nmodel {model_mb:.0f} MB, moe {moe_mb:.0f} MB; peak RSS growth: full load {full['delta_mb']} MB, "
        f"streaming calibration {cal['delta_mb']} MB, streaming reconstruction {rec['delta_mb']} MB"
    )
    assert model_mb > 500
    assert full["delta_mb"] > 0.9 * model_mb  # the probe does see a whole model when one is loaded
    assert cal["delta_mb"] < 0.25 * model_mb
    assert rec["delta_mb"] < 0.25 * (model_mb + moe_mb)
