"""Ranks, device and precision for the streaming passes (calibration, router fitting, evaluation).

A pass launched by torchrun (or srun starting torchrun on each node) sees RANK / WORLD_SIZE /
MASTER_ADDR in its environment and joins an env:// process group: gloo on CPU, NCCL on CUDA. A
plain `python` launch is a 1-rank world with no process group at all. Each rank takes its share of
the work items (`Ranks.share`) and the per-rank sums are added with `Ranks.sum_` (exact float64 sums,
equal to one rank up to float64 rounding). Nothing is pickled: only tensors cross ranks.

Legend: N items, W world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dive_ds.choices import DEVICES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: this rank's CUDA device when one is visible, else the CPU. Refuses a device that is not there."""
    if name not in DEVICES:
        raise ValueError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        raise ValueError(
            "--device cuda: no CUDA device is visible on this machine; pass --device cpu (or auto)"
        )
    if name == "cpu" or not has_cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} has no GPU: only {count} visible; start at most {count} ranks per node"
        )
    return torch.device("cuda", local_rank)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs that multiply bf16 natively (AMD Zen 4+, Intel Cooper Lake / Sapphire
Rapids+). Elsewhere PyTorch emulates bf16 matmuls, slower than float32."""


def dtype_record(name: str) -> str:
    """How outputs record a --dtype name: "fp32" -> "float32", "bf16" -> "bfloat16"."""
    return str(DTYPES[name]).removeprefix("torch.")


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype name of a compute dtype: torch.bfloat16 -> "bf16"."""
    return next(n for n, d in DTYPES.items() if d == dtype)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU multiply bf16 natively? (Linux x86: its flags; anywhere else: no.)"""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute precision of the resident layer: fp32 anywhere; bf16 on CUDA and on a CPU that multiplies bf16
    natively (statistics and NLL sums stay float32/64)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "bf16" and device.type != "cuda" and not cpu_has_native_bf16():
        raise ValueError(
            "--dtype bf16: this CPU has no native bf16 matmuls (flags avx512_bf16 / amx_bf16), where bf16 is "
            "slower than fp32; pass --dtype fp32, or run on a GPU"
        )
    return DTYPES[name]


def auto_dtype(device: torch.device) -> str:
    """The fastest precision `device` computes natively: bf16 on a bf16 GPU or CPU, else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the pass: rank, world size and compute device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, n_items: int) -> list[int]:
        """This rank's items of 0..n-1: every world-th one, starting at its rank (balanced to one item)."""
        return list(range(self.rank, n_items, self.world))

    def check_items(self, n_items: int, what: str = "windows") -> None:
        if n_items < self.world:
            raise ValueError(
                f"{self.world} ranks but only {n_items} {what}: every rank needs at least one; "
                f"launch at most {n_items} ranks or use more {what}"
            )

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `t` in place across ranks; returns it. A no-op on one rank."""
        if not self.distributed:
            return t
        if self._backend_device().type == t.device.type:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t
        moved = t.to(self._backend_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (e.g. a stop request seen by one)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self._backend_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `t` ([n_r, ...], n_r may differ), concatenated in rank order, on every rank."""
        if not self.distributed:
            return t
        dev = self._backend_device()
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes_i = [int(s.item()) for s in sizes]
        most = max(sizes_i)
        pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
        pad[: t.shape[0]] = t.to(dev)
        got = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(got, pad)
        return torch.cat([g[:k] for g, k in zip(got, sizes_i)]).to(t.device)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `t` in place with rank `src`'s values on every rank; returns it. A no-op on one rank."""
        if not self.distributed:
            return t
        moved = t if self._backend_device().type == t.device.type else t.to(self._backend_device())
        dist.broadcast(moved, src=src)
        if moved is not t:
            t.copy_(moved)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _backend_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from a torchrun-style environment; (0, 1, 0) without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise ValueError(
            f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun (or srun + torchrun)"
        )
    return rank, world, local


@contextlib.contextmanager
def start_ranks(device: str = "auto", timeout_s: int = 1800) -> Iterator[Ranks]:
    """The pass's Ranks: joins (and afterwards leaves) an env:// process group when launched on many ranks.

    A process group that already exists (e.g. a caller's) is used as it is and left open."""
    rank, world, local = launched_world()
    dev = resolve_device(device, local)
    if world == 1:
        yield Ranks(0, 1, dev)
        return
    made = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        made = True
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), dev)
        if made:  # every rank finished; on an error no barrier: the others may be inside a collective
            with contextlib.suppress(Exception):
                dist.barrier()
    finally:
        if made:
            dist.destroy_process_group()


def compute_dtype(device: str, dtype: str) -> torch.dtype:
    """--device / --dtype checked before any work (the same verdict on every rank): the compute dtype."""
    _, _, local = launched_world()
    return resolve_dtype(dtype, resolve_device(device, local))


def host_memory_per_rank() -> int | None:
    """This node's available memory (/proc/meminfo MemAvailable) over its ranks (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fits_beside(nbytes: int, where: torch.device, share: float = 0.25, reserve: int = 0) -> bool:
    """Is `nbytes` under `share` of the memory free at `where` (a GPU's free memory, else this rank's share of
    the host's available memory) once `reserve` bytes still to be allocated are set aside? For buffers that
    only save work: kept when they fit, else the work is done again."""
    if where.type == "cuda":
        free, _ = torch.cuda.mem_get_info(where)
    else:
        free = host_memory_per_rank()
    return free is not None and nbytes < share * (free - reserve)
