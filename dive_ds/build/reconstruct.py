"""`dive-ds reconstruct`: plan the experts (build/expert_plan.py) and write the MoE (build/moe_writer.py),
as one Hugging Face folder or this node's part of a sharded one; with --router-init fit, fit the routers too."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from dive_ds.build.expert_plan import ReconstructConfig, cluster_groups, load_groups, plan_experts
from dive_ds.build.fit_router import run_fit_router
from dive_ds.build.moe_writer import write_moe, write_moe_shards
from dive_ds.build.outputs import (
    check_new_out,
    check_not_input,
    claim_output,
    reconstruction_identity,
    recorded_reconstruction,
)
from dive_ds.io.atomic import check_free_space
from dive_ds.io.calibration import Calibration, check_same_model, dense_model_path, load_calibration
from dive_ds.io.fingerprint import folder_fingerprint
from dive_ds.io.placement import NodePlacement
from dive_ds.io.shards import check_shard_out
from dive_ds.stats import n_keep


def run_reconstruct(
    calib_dir: str | Path,
    groups_file: str | Path | None,
    out: str | Path,
    cfg: ReconstructConfig,
    model: str | None = None,
    shards: NodePlacement | None = None,
    force: bool = False,
) -> Path:
    """Plan the experts and write the MoE: one HF folder, or with `shards` this node's part of a sharded folder.

    An `out` that holds this same reconstruction is reused; anything else there is refused unless `force`."""
    if shards is not None:
        if force:
            raise ValueError("--force does not apply with --shards (the nodes share the shard folder); "
                             "choose another --out or remove it")  # fmt: skip
        if cfg.router_init == "fit":
            raise ValueError(
                "--router-init fit needs the whole MoE: reconstruct --shards with --router-init random, then run "
                "`dive-ds fit-router --moe SHARDS --calib DIR --out DIR` once every node has finished"
            )
        shards.check(cfg.num_experts)
        check_shard_out(Path(out))
    cal = load_calibration(calib_dir)
    n_layers, ffn = cal.stats.sum_DLF.shape[1:]
    if cfg.num_experts > ffn:
        raise ValueError(
            f"--experts {cfg.num_experts}: the model's FFN has {ffn} channels; use at most {ffn} experts"
        )
    groups = None
    stats, names = cal.stats, cal.domains
    if cfg.groups_from == "clusters":  # per-layer token clusters instead of domain groups
        if cal.clusters is None:
            raise ValueError(
                f"{cal.path} has no token clusters; calibrate with --token-clusters {cfg.num_experts}"
            )
        if groups_file is not None:
            raise ValueError(
                "--groups-from clusters takes its groups from the calibration: leave out --groups"
            )
        stats = cal.clusters
        names, groups = cluster_groups(stats, cfg.num_experts)
    elif cfg.method == "dive":
        if groups_file is None:
            raise ValueError("dive reconstruction needs --groups FILE (from `dive-ds mine`, or your own)")
        groups = load_groups(groups_file, cal.domains)
        if len(groups) != cfg.num_experts:
            raise ValueError(
                f"--experts {cfg.num_experts} but {groups_file} has {len(groups)} groups; "
                "make them equal (re-run `dive-ds mine --experts N`)"
            )
    if cfg.method == "nomining" and cfg.num_experts > len(cal.domains):
        raise ValueError(
            f"--experts {cfg.num_experts} is larger than the {len(cal.domains)} domains; "
            f"use --experts <= {len(cal.domains)}"
        )
    model_dir = dense_model_path(cal, model)
    if shards is None:
        inputs = {"calibration": cal.path, "dense model": model_dir, "groups file": groups_file}
        check_not_input(Path(out), inputs)
    check_same_model(cal, model_dir)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    width = ffn // cfg.num_experts if cfg.method == "llama-moe" else n_keep(ffn, cfg.prune_ratio)
    experts_bytes = 3 * 4 * hidden * n_layers * cfg.num_experts * width  # fp32; a lower bound of the MoE
    plan = plan_experts(stats, names, groups, cfg)
    identity = reconstruction_identity(plan, cfg, model_dir, cal.fingerprint)
    # the calibration's own fingerprint too: `compare --reuse-models` reuses a model only if it is unchanged
    extra = {
        "calibration": str(cal.path),
        "calibration_fingerprint": folder_fingerprint(cal.path),
        "identity": identity,
    }
    t0 = time.time()
    if shards is not None:
        check_free_space(Path(out), experts_bytes // shards.nodes, "the MoE's experts at --out")
        rec = write_moe_shards(model_dir, plan, cfg, out, shards, extra_info=extra)
        n = f"node {shards.node}/{shards.nodes}"
        if rec["reused"]:
            print(
                f"{n}: reused its complete shards in {out} (nodes/node-{shards.node:05d}.json); nothing to do"
            )
        else:
            print(
                f"{n} wrote experts {rec['experts']} (of {cfg.num_experts}) of {len(plan.widths_L)} layers"
                f"{' and the shared tensors' if shards.node == 0 else ''}: {len(rec['files'])} files, "
                f"{rec['tensor_bytes'] / 2**20:.1f} MiB to {out} in {time.time() - t0:.1f}s"
            )
        return Path(out)
    if cfg.router_init == "fit":
        check_free_space(Path(out), experts_bytes, "the MoE's experts at --out")
        return _reconstruct_fitted(model_dir, plan, cfg, out, cal, t0)
    recorded = recorded_reconstruction(Path(out), identity, plan)  # None: out holds no write_moe output
    if claim_output(Path(out), identity, recorded, "dive_experts.json", force):
        print(f"{out} already holds this reconstruction; reusing it (delete it to rebuild)")
        return Path(out)
    check_free_space(Path(out), experts_bytes, "the MoE's experts at --out")  # after the reuse check
    write_moe(model_dir, plan, cfg, out, extra_files=extra)
    print(
        f"wrote {cfg.method} MoE ({cfg.num_experts} experts x {_width(plan.widths_L)} channels, top-{cfg.top_k}) "
        f"to {out} in {time.time() - t0:.1f}s"
    )
    return Path(out)


def _width(widths_L: list[int]) -> str:
    """One width, or the range of per-layer widths (adaptive FLAP)."""
    lo, hi = min(widths_L), max(widths_L)
    return str(lo) if lo == hi else f"{lo}-{hi} (per layer, {sum(widths_L)} in all)"


def _reconstruct_fitted(
    model_dir: Path, plan, cfg: ReconstructConfig, out, cal: Calibration, t0: float
) -> Path:
    """write_moe into a private temporary folder next to `out`, fit its routers into `out`, remove the temporary."""

    out = Path(out)
    check_new_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.unfitted-"))
    try:
        write_moe(model_dir, plan, cfg, tmp / "moe", extra_files={"calibration": str(cal.path)})
        print(f"wrote {cfg.method} MoE in {time.time() - t0:.1f}s; fitting its routers", flush=True)
        run_fit_router(tmp / "moe", cal.path, out, dense=model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
