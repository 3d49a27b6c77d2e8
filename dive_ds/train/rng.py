"""A training rank's RNG states (Python, NumPy, torch CPU and CUDA) as a safetensors file, never a pickle.

Unpickling a file can run any code it names, so the trainer's own checkpoint files hold only tensors
and JSON: the state tables are integer tensors, the few scalars (Python's gauss_next, NumPy's position
and cached Gaussian) JSON in the file's metadata. Loading parses and validates them; nothing in the
file is executed. Restoring is bit-exact: every value round-trips unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

RNG_FILE = "rng_state_rank{:04d}.safetensors"
LEGACY_RNG_FILE = "rng_state_rank{:04d}.pt"
"""Written by dive_ds before the safetensors format (a pickle); never loaded."""
FORMAT = "dive_ds-rng/1"
_PY_WORDS = 625  # MT19937: 624 words + position
_NP_WORDS = 624


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / RNG_FILE.format(rank)


def capture() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states -> (tensors, string metadata) for safetensors."""
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python.state": torch.tensor(words, dtype=torch.int64),
        "numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {
        "format": FORMAT,
        "python": json.dumps({"version": version, "gauss_next": gauss_next}),
        "numpy": json.dumps(
            {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
        ),
    }
    return tensors, meta


def save_rng_state(path: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = capture()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid dive_ds RNG state file ({why}); the checkpoint is damaged or was not written "
        "by dive_ds: resume from another checkpoint (remove this step_* folder)"
    )


def load_rng_state(path: Path) -> dict:
    """Parse and validate an RNG state file (safetensors: no code runs) -> the states, ready for `restore`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError and friends: a file that is not safetensors at all
        raise _bad(
            path, f"unreadable as safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if meta.get("format") != FORMAT:
        raise _bad(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        py = json.loads(meta["python"])
        npy = json.loads(meta["numpy"])
        words = tensors["python.state"]
        keys = tensors["numpy.keys"]
        cpu = tensors["torch"]
        state = {
            "python": (int(py["version"]), tuple(int(w) for w in words.tolist()), py["gauss_next"]),
            "numpy": (
                str(npy["kind"]),
                keys.numpy().astype(np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            ),
            "torch": cpu,
            "cuda": [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))],
        }
    except (KeyError, ValueError, TypeError) as e:
        raise _bad(path, f"missing or malformed entry {e}") from None
    if (
        words.dtype != torch.int64
        or words.shape != (_PY_WORDS,)
        or not bool(((words >= 0) & (words < 2**32)).all())
    ):
        raise _bad(path, "python.state is not 625 32-bit words")
    if (
        keys.dtype != torch.int64
        or keys.shape != (_NP_WORDS,)
        or not bool(((keys >= 0) & (keys < 2**32)).all())
    ):
        raise _bad(path, "numpy.keys is not 624 32-bit words")
    if py["gauss_next"] is not None and not isinstance(py["gauss_next"], float):
        raise _bad(path, "python gauss_next is not a float")
    for name, t in [("torch", cpu)] + [(f"cuda.{i}", c) for i, c in enumerate(state["cuda"])]:
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise _bad(path, f"{name} is not a 1-D uint8 tensor")
    return state


def snapshot() -> tuple:
    """This process's RNG states in memory (cheap: taken at every step start of a multi-micro-batch step)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rewind(snap: tuple) -> None:
    """Set the RNGs back to a `snapshot`."""
    py, npy, cpu, cuda = snap
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def restore(state: dict) -> None:
    """Set this process's RNGs from `load_rng_state`'s result."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_no_legacy(folder: Path, rank: int) -> None:
    """Refuse a checkpoint whose RNG state for `rank` exists only as an old pickle (which is never loaded)."""
    legacy = Path(folder) / LEGACY_RNG_FILE.format(rank)
    if legacy.is_file() and not rng_file(folder, rank).is_file():
        raise ValueError(
            f"{legacy} holds RNG states as a pickle (dive_ds before safetensors), which is never loaded: "
            "unpickling a file can run code; delete the checkpoint's rng_state_rank*.pt files to resume "
            "without restoring the RNG states (not bit-exact), or remove the checkpoint to restart the stage"
        )
