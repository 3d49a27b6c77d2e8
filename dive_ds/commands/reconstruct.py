"""`dive-ds reconstruct`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dive_ds.argtypes import nonneg_int, positive_int, ratio
from dive_ds.choices import METHODS, PRESETS, ROUTER_INITS
from dive_ds.flags import flag

HELP = "build the MoE: one expert per group, pruned from the dense FFN"
DESCRIPTION = (
    "For each group the exactly merged statistics of its domains give the expert's kept channels per layer "
    "(top (1-r) by score) and its FLAP compensation bias. Attention, embeddings, norms and LM head are "
    "copied; a new router per layer. Streams the dense checkpoint one layer at a time. Baselines use --method."
)


@dataclass
class Settings:
    calib: str = flag(None, "calibration folder from `dive-ds calibrate`", required=True)
    groups: str | None = flag(None, "groups JSON {group: [domains]} (from `dive-ds mine` or your own); required "
                              "for --method dive")  # fmt: skip
    preset: str | None = flag(None, "reference settings: 1of8 = N=8, k=1, r=0.5; 2of8 = N=8, k=2, r=0.75",
                              choices=sorted(PRESETS))  # fmt: skip
    experts: int | None = flag(None, "N experts (default 8)", type=positive_int)
    top_k: int | None = flag(None, "k experts per token (default 1)", type=positive_int)
    prune_ratio: float | None = flag(
        None, "r, fraction of FFN channels each expert drops (default 0.5)", type=ratio
    )
    score: str = flag("wifv", "channel score (default wifv)", choices=["wifv", "ifv", "wifn"])
    no_bias_compensation: bool = flag(False, "experts without the FLAP bias")
    groups_from: str = flag("domains", "domains (default): experts from domain groups (--groups, or random ones "
                            "for nomining); clusters: expert c of each layer from that layer's token cluster c "
                            "(`calibrate --token-clusters N`)", choices=["domains", "clusters"])  # fmt: skip
    shared_ratio: float = flag(0.0, "s: an always-on shared expert of that fraction of the FFN (the pooled "
                               "statistics' best channels); routed experts keep (1 - r - s) of it each, so top-1 "
                               "activates as many channels as without (default 0: none, the paper's DIVE)",
                               type=ratio)  # fmt: skip
    router_init: str = flag("random", "random: seeded N(0, 0.02) (the paper's recipe); centroid: from the groups' "
                            "mean MLP inputs; fit: fitted from the dense model (as `dive-ds fit-router`; "
                            "recommended)", choices=ROUTER_INITS)  # fmt: skip
    method: str = flag("dive", "dive (default) or a baseline: llama-moe (N disjoint experts of F/N), random-halves "
                       "(random-split: an independent random half per expert), upcycle (N dense copies, r=0), "
                       "nomining (random domain groups), flap (1 dense pruned FFN), flap-adaptive (FLAP's "
                       "per-layer widths)", choices=METHODS)  # fmt: skip
    seed: int = flag(42, "router init / random baselines seed", type=nonneg_int)
    model: str | None = flag(None, "dense model (default: the one recorded in the calibration)")
    out: str = flag(None, "output MoE folder (Hugging Face format; with --shards: the shard folder all nodes "
                    "share)", required=True)  # fmt: skip
    shards: bool = flag(False, "write this node's part of a sharded folder (one task per node, all into the same "
                        "--out; join with `dive-ds consolidate`)")  # fmt: skip
    node_rank: int | None = flag(
        None, "with --shards: this node's id (default $SLURM_NODEID)", type=nonneg_int
    )
    nodes: int | None = flag(
        None, "with --shards: nodes in the job (default $SLURM_NNODES)", type=positive_int
    )
    gpus_per_node: int | None = flag(
        None, "with --shards: ranks per node of the training job", type=positive_int
    )
    ep: int | None = flag(None, "with --shards: expert-parallel size of the training job", type=positive_int)
    force: bool = flag(False, "replace an --out folder that holds anything but this same reconstruction (which is "
                       "always reused; delete the folder to rebuild)")  # fmt: skip


def _env_int(flag_name: str, value: int | None, env: str) -> int:
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw is None:
        raise ValueError(f"--shards needs {flag_name} (or ${env} from SLURM); pass {flag_name} N")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${env}={raw!r} is not an integer; pass {flag_name} N") from None


def placement(s: Settings):
    """The node placement of `reconstruct --shards`, validated; None without --shards."""
    from dive_ds.io.placement import NodePlacement

    given = {"--node-rank": s.node_rank, "--nodes": s.nodes, "--gpus-per-node": s.gpus_per_node, "--ep": s.ep}
    if not s.shards:
        named = [f for f, v in given.items() if v is not None]
        if named:
            raise ValueError(f"{named[0]} only applies with --shards; add --shards or drop {named[0]}")
        return None
    for name in ("--gpus-per-node", "--ep"):
        if given[name] is None:
            raise ValueError(f"--shards needs {name}; pass the training job's {name} N")
    return NodePlacement(
        node=_env_int("--node-rank", s.node_rank, "SLURM_NODEID"),
        nodes=_env_int("--nodes", s.nodes, "SLURM_NNODES"),
        gpus_per_node=s.gpus_per_node,
        ep_size=s.ep,
    )


def lock_tag(s: Settings) -> str | None:
    """Every node of --shards writes its part of one folder: each holds its own lock."""
    return f"node-{placement(s).node}" if s.shards else None


def run(s: Settings) -> int:
    from dive_ds.build.expert_plan import reconstruct_config
    from dive_ds.build.reconstruct import run_reconstruct

    cfg = reconstruct_config(s.preset, s.experts, s.top_k, s.prune_ratio, s.method, s.score,
                             not s.no_bias_compensation, s.router_init, s.seed, s.shared_ratio,
                             s.groups_from)  # fmt: skip
    where = placement(s)
    if where is not None:
        where.check(cfg.num_experts)
    run_reconstruct(s.calib, s.groups, s.out, cfg, s.model, shards=where, force=s.force)
    return 0
