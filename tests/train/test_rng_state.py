"""The trainer's RNG state files: tensors and JSON in safetensors (no pickle), restored bit-exactly."""

from __future__ import annotations

import random

import numpy as np
import torch


def test_rng_state_round_trip_is_bit_exact(tmp_path):
    from dive_ds.train import rng

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state (gauss_next)
    np.random.standard_normal()  # leaves NumPy's cached Gaussian unused -> has_gauss 1
    path = tmp_path / rng.RNG_FILE.format(0)
    rng.save_rng_state(path)

    def draws():
        return (random.gauss(0, 1), random.getrandbits(64), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 2**31, 4).tolist(), torch.rand(4).tolist(), torch.randn(2).tolist())  # fmt: skip

    first = draws()
    draws()
    rng.restore(rng.load_rng_state(path))
    assert draws() == first
    # only tensors and JSON strings in the file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) >= {"python.state", "numpy.keys", "torch"}
        assert all(isinstance(v, str) for v in f.metadata().values())
