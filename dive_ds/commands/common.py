"""Flags several commands share."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.flags import flag


@dataclass
class DeviceFlags:
    """--device / --dtype of the commands that run the model; many ranks: launch them with torchrun."""

    device: str = flag("auto", "where the model runs: auto (this rank's GPU if there is one, else the CPU), cpu or cuda",
                       choices=["auto", "cpu", "cuda"])  # fmt: skip
    dtype: str = flag("fp32", "model weights' dtype: fp32 (default) or bf16 (a GPU, or a CPU with native bf16); "
                      "NLL and sums stay float32/64",
                      choices=["fp32", "bf16"])  # fmt: skip


def seeds(text: str, name: str) -> tuple[int, ...]:
    """Comma-separated distinct integers (ValueError naming the flag otherwise)."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} {text!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{name} {text!r}: give at least one seed, each once")
    return out


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
