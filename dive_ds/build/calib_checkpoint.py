"""Per-layer checkpoints of the calibration pass (`dive-ds calibrate --checkpoint-dir DIR`).

After every K layers each rank writes its carried hidden states and its partial float64 sums to
DIR/calibrate-<id>/rank{r}-layer{l}.safetensors (temp file + os.replace), then rank 0 writes
state.json (layers done, world size, the run's identity) last, atomically; files of older layers are
removed only once the new state.json is in place. <id> is a hash of the identity (model fingerprint,
the windows, compute dtype, batch size), so relaunching the same command finds its own folder.

DIR may hold the user's other files: they are never touched. A `calibrate-*` folder of another run,
or a file in this run's folder that it did not write, is refused in one line before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "calibrate-"


STATE = "state.json"


_RANK_FILE = re.compile(r"^rank(\d+)-layer(\d+)\.safetensors$")


_TEMP_FILE = re.compile(r"^\.(rank\d+-layer\d+\.safetensors|state\.json)\.tmp-\d+$")


def windows_sha(windows: dict[str, torch.Tensor]) -> str:
    """sha256 of the domain names, shapes and token ids, in order."""
    h = hashlib.sha256()
    for name, w in windows.items():
        h.update(json.dumps([name, list(w.shape)]).encode())
        h.update(w.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}  # fmt: skip
CHUNK_BYTES = 256 << 20


def save_streamed(tensors: dict[str, torch.Tensor], path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write `tensors` (on any device) as a safetensors file, copying at most `chunk_bytes` of a tensor to the
    host at a time: the format's header (8-byte length, JSON of dtype, shape and byte offsets, padded to 8),
    then every tensor's little-endian bytes in header order. safetensors.torch.load_file reads it."""
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            flat = t.detach().reshape(-1)
            step = max(1, chunk_bytes // t.element_size())
            for i in range(0, flat.numel(), step):
                f.write(memoryview(flat[i : i + step].to("cpu").contiguous().view(torch.uint8).numpy()))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LayerCheckpoint:
    """This run's checkpoint folder inside `root`, for a world of `world` ranks."""

    root: Path
    identity: dict
    world: int

    @property
    def folder(self) -> Path:
        return self.root / f"{PREFIX}{run_key(self.identity)}"

    def rank_file(self, rank: int, layers_done: int) -> Path:
        return self.folder / f"rank{rank}-layer{layers_done}.safetensors"

    def check(self) -> int:
        """Layers already done by a checkpoint of this very run (0: none). Raises, in one line, on a
        checkpoint of another run, a file this run did not write, or another world size."""
        flag = f"--checkpoint-dir {self.root}"
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"{flag} is a file, not a folder; pass a folder on shared storage")
        if not self.root.exists():
            return 0
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(PREFIX) and p != self.folder:
                raise ValueError(
                    f"{flag} holds a checkpoint of another calibration ({p.name}: other model, windows, dtype "
                    "or batch size); pass an empty --checkpoint-dir or the same inputs"
                )
        if not self.folder.exists():
            return 0
        if not self.folder.is_dir():
            raise ValueError(
                f"{flag}: {self.folder} is not a folder of this run; pass an empty --checkpoint-dir"
            )
        strangers = [
            p.name
            for p in self.folder.iterdir()
            if p.name != STATE and not _RANK_FILE.match(p.name) and not _TEMP_FILE.match(p.name)
        ]
        if strangers:
            raise ValueError(
                f"{flag}: {self.folder} holds files this run did not write ({', '.join(sorted(strangers)[:3])}); "
                "pass an empty --checkpoint-dir"
            )
        state = self.state()
        if state is None:
            return 0  # stopped before its first complete checkpoint: start again (its files are overwritten)
        if state.get("identity") != self.identity:
            raise ValueError(
                f"{flag} holds a checkpoint of another calibration ({self.folder.name}); "
                "pass an empty --checkpoint-dir or the same inputs"
            )
        done = int(state["layers_done"])
        if state["world_size"] != self.world:
            raise ValueError(
                f"{flag} holds this calibration's checkpoint after layer {done}/{state['layers']} written by "
                f"{state['world_size']} ranks, but {self.world} were launched; relaunch with "
                f"{state['world_size']} ranks (torchrun --nproc-per-node ...) or pass an empty --checkpoint-dir"
            )
        missing = [r for r in range(self.world) if not self.rank_file(r, done).is_file()]
        if missing:
            raise ValueError(
                f"{flag}: the checkpoint after layer {done} lacks rank{missing[0]}'s file; "
                "it is incomplete: pass an empty --checkpoint-dir"
            )
        return done

    def state(self) -> dict | None:
        path = self.folder / STATE
        return json.loads(path.read_text()) if path.is_file() else None

    def save_rank(self, rank: int, layers_done: int, tensors: dict[str, torch.Tensor]) -> None:
        """This rank's carried hidden states and partial sums after `layers_done` layers, streamed to the file
        in bounded pieces (a GPU's hidden-state buffer never has a whole copy in host memory)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.rank_file(rank, layers_done), lambda p: save_streamed(tensors, p))

    def commit(self, layers_done: int, layers: int, made_root: bool) -> None:
        """Rank 0, after every rank's file is written: the state that makes them the checkpoint."""
        before = self.state()
        made_root = made_root or bool(before and before.get("made_root"))  # a resumed run keeps the first's
        state = {
            "identity": self.identity,
            "world_size": self.world,
            "layers_done": layers_done,
            "layers": layers,
            "made_root": made_root,
        }
        _atomic_write(self.folder / STATE, lambda p: p.write_text(json.dumps(state, indent=2) + "\n"))

    def prune(self, rank: int, layers_done: int) -> None:
        """This rank's files of other layers (after the state for `layers_done` is in place)."""
        for p in self.folder.iterdir():
            m = _RANK_FILE.match(p.name)
            if m and int(m.group(1)) == rank and int(m.group(2)) != layers_done:
                p.unlink(missing_ok=True)

    def load_rank(self, rank: int, layers_done: int) -> dict[str, torch.Tensor]:
        return load_file(self.rank_file(rank, layers_done))

    def remove(self, made_root: bool) -> None:
        """Exactly what this run wrote: its files, its folder, and `root` if this run made it and it is empty."""
        state = self.state()
        made_root = made_root or bool(state and state.get("made_root"))
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if p.name == STATE or _RANK_FILE.match(p.name) or _TEMP_FILE.match(p.name):
                    p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        if made_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only if empty
