"""The process group: initialise it through DeepSpeed (a 1-rank world without a launcher), tear it
down, and the device and barrier every rank uses."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(local_rank: int | None = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed -> (rank, world size).

    A plain `python launchers/retrain.py` has no launcher env: default to a 1-rank world here so
    `deepspeed.init_distributed` does not go looking for MPI.
    """
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
        }.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _quiet_deepspeed()
    import deepspeed

    deepspeed.init_distributed(dist_init_required=None)
    return dist.get_rank(), dist.get_world_size()


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def _quiet_deepspeed() -> None:
    import warnings

    # torch deprecates the collective names DeepSpeed 0.19 still calls, once per call: noise, not news
    warnings.filterwarnings(
        "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
    )
    level = os.environ.get("DIVE_DS_DEEPSPEED_LOG", "warning").upper()
    logging.getLogger("DeepSpeed").setLevel(getattr(logging, level, logging.WARNING))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def current_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()
