"""`dive-ds consolidate`: a sharded MoE folder -> one Hugging Face folder (a ZeRO checkpoint is consolidated
by `dive-ds retrain --consolidate`)."""

from __future__ import annotations

from dataclasses import dataclass

from dive_ds.flags import flag

HELP = "join a sharded MoE folder into one Hugging Face dive_moe folder"
DESCRIPTION = (
    "Checks that every node of `reconstruct --shards` finished, then streams the shards layer by layer into "
    "the folder `reconstruct` writes without --shards."
)


@dataclass
class Settings:
    shards: str = flag(None, "sharded folder (the --out of `reconstruct --shards`)", required=True)
    out: str = flag(None, "output folder (Hugging Face format; must not exist)", required=True)


def run(s: Settings) -> int:
    from dive_ds.io.shard_reader import consolidate_shards

    out = consolidate_shards(s.shards, s.out)
    print(f"consolidated {s.shards} -> {out} (Hugging Face dive_moe folder)")
    return 0
