"""Fingerprints of model folders: the identity of an input a run records and later checks.

A folder's fingerprint hashes, for every regular file under it (sorted relative paths), the path,
the size and three 64 KiB samples of its bytes (start, middle, end). Another model at the same
path (other weights, other config, a file more or less) gets another fingerprint; a copy, a hard
link or a move of the same files gets the same one. Reading is bounded (at most 192 KiB a file),
so a 70B checkpoint is fingerprinted in well under a second on a local disk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE = 1 << 16
IGNORED = frozenset({"retrain_stage.json"})
"""Record files a stage adds to the folder it writes (not part of the model it holds)."""


def folder_fingerprint(folder: str | Path) -> str:
    """16 hex digits identifying the files of `folder` (see the module docstring)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in IGNORED):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                f.seek(offset)
                h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def input_record(folder: str | Path) -> dict:
    """What a run records about an input folder: its absolute path and its fingerprint."""
    folder = Path(folder).resolve()
    return {"path": str(folder), "fingerprint": folder_fingerprint(folder)}


def check_input(record: dict, what: str) -> Path:
    """The folder a record names, if it still holds the same files; one-line ValueError otherwise."""
    path = Path(record["path"])
    if not path.is_dir():
        raise ValueError(f"{what} {path} is gone; restore it (fingerprint {record.get('fingerprint')})")
    expected = record.get("fingerprint")
    if expected is not None:
        found = folder_fingerprint(path)
        if found != expected:
            raise ValueError(
                f"{what} {path} has changed since it was recorded (fingerprint {found}, recorded {expected}): "
                "another model is at that path; restore the original"
            )
    return path


def git_rev(short: bool = False) -> str | None:
    """The commit of the dive_ds checkout that runs (None outside a git checkout): recorded with outputs."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except Exception:
        return None
