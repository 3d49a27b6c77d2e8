"""`dive-ds fit-router`."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.build.router_config import RouterFitConfig
from dive_ds.commands.common import DeviceFlags
from dive_ds.flags import flag, nested

HELP = "fit every router from the dense model (reconstruction-error labels)"
DESCRIPTION = (
    "Streams the calibration windows through the MoE layer by layer (one layer resident). At each layer every "
    "token is labelled with the expert whose output comes closest to the dense FFN's on the same input; the "
    "router is fitted as a multinomial logistic regression on the MLP input, and the hidden states go on "
    "through the MoE routed by it. Writes a new folder (HF or sharded, as the input) with router_fit.json."
)


@dataclass
class Settings:
    moe: str = flag(
        None, "dive_moe folder (from `dive-ds reconstruct`, with or without --shards)", required=True
    )
    calib: str = flag(None, "the calibration folder the MoE was reconstructed from", required=True)
    out: str = flag(None, "output folder (must not exist or be empty)", required=True)
    model: str | None = flag(None, "dense model (default: the one recorded in the calibration)")
    fit: RouterFitConfig = nested(RouterFitConfig)
    run_on: DeviceFlags = nested(DeviceFlags)


def run(s: Settings) -> int:
    from dive_ds.build.fit_router import run_fit_router

    run_fit_router(s.moe, s.calib, s.out, s.fit, dense=s.model, device=s.run_on.device, dtype=s.run_on.dtype)
    return 0
