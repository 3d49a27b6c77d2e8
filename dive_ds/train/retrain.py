"""DIVE retraining with DeepSpeed: the orchestration of a run's stages.

A run is a sequence of stages (router -> experts -> optional continue). `train` checks everything
that can be checked without training, records the run, and runs each stage not yet done with
dive_ds.train.stage.run_stage (which loads its input, trains, checkpoints and writes
OUT/stages/<name>/model); the last stage's output is linked to OUT/model. `retrain` is the
launcher's entry: configs, process group, train, teardown.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist
import yaml

from dive_ds.io.atomic import OutputLock, staged_dir, write_json, write_text
from dive_ds.io.fingerprint import git_rev
from dive_ds.models.moe import DiveMoeConfig
from dive_ds.parallel.distributed import accelerator_name, barrier, setup_distributed, teardown_distributed
from dive_ds.train import rng
from dive_ds.train.checkpoint import check_resume_ep_size, latest_tag
from dive_ds.train.config import RunConfig
from dive_ds.train.data import data_recipe, load_tokenizer, resolve_domains
from dive_ds.train.ds_config import launch_ep_size, resolve_ds_config, resolve_ep_size
from dive_ds.train.evaluation import eval_windows
from dive_ds.train.identity import claim_run_dir, run_identity, supersede, write_identity
from dive_ds.train.model import check_moe_folder
from dive_ds.train.planning import DONE_FILE, plan_stages, stage_inputs
from dive_ds.train.stage import run_stage
from dive_ds.train.stop import STOP_FILE
from dive_ds.train.trainable import check_ep_stage


def _versions() -> dict:
    import importlib.metadata as md

    import dive_ds

    out = {"dive_ds": dive_ds.__version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "transformers", "safetensors", "tensorboard"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _record_run(
    run: RunConfig,
    ds: dict,
    ds_source: str,
    world: int,
    recipe: dict,
    argv: list[str] | None,
    expert_parallel: dict | None = None,
) -> None:
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "run_config.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))
    write_json(out / "ds_config.json", ds)
    info = {
        "versions": _versions(),
        "git_rev": git_rev(),
        "world_size": world,
        "expert_parallel": expert_parallel,
        "accelerator": accelerator_name(),
        "ds_config_source": ds_source,
        "argv": argv or sys.argv,
        "data_recipe": recipe,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "run_info.json", info)
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")


def check_batch_fits(run: RunConfig, memory: int | None = None) -> None:
    """Refuse a global batch whose token ids alone (int64, one step) exceed this machine's memory: a typo
    such as `global_batch_size: 1e9` is a one-line error, not an out-of-memory kill."""
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = run.train.global_batch_size * run.data.seq_len * 8
    if need > memory:
        raise ValueError(
            f"run config: train.global_batch_size={run.train.global_batch_size} x data.seq_len={run.data.seq_len} "
            f"tokens per step: their ids alone need {need / 1e9:.0f} GB and this machine has {memory / 1e9:.0f} GB; "
            "use a smaller global batch (gradient accumulation makes a large one from micro batches)"
        )


def _link_tree(src: Path, dst: Path) -> None:
    """dst becomes a copy of src made of hard links where possible (no second copy of the weights); a dst
    that already is this copy stays, anything else there is moved aside (dive_ds.io.atomic.publish)."""
    done = src / DONE_FILE
    if (dst / DONE_FILE).is_file() and (dst / DONE_FILE).read_bytes() == done.read_bytes():
        return

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    with staged_dir(dst) as tmp:
        tmp.rmdir()
        shutil.copytree(src, tmp, copy_function=link)


def _one_run_per_out_dir(fn):
    """Run `fn(run, ...)` while rank 0 holds the out_dir's lock (a second run on it is refused in one line
    naming the first one's pid)."""

    @functools.wraps(fn)
    def locked(run: RunConfig, *args, **kwargs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        with OutputLock(run.out_dir, "retrain") if rank == 0 else contextlib.nullcontext():
            return fn(run, *args, **kwargs)

    return locked


@_one_run_per_out_dir
def train(
    run: RunConfig,
    ds_raw: dict,
    ds_source: str = "DeepSpeed config",
    stages: list[str] | None = None,
    argv: list[str] | None = None,
    force: bool = False,
) -> dict:
    """Run (or resume) the run's stages on an initialised process group -> {stage: summary}.

    Everything that can be checked without training is checked first (one-line ValueErrors).
    out_dir must be absent, empty, or hold this same run (dive_ds.train.identity); with `force`
    another run's files there are moved aside into OUT/superseded-<time>/, never deleted.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    ds = resolve_ds_config(ds_raw, run, world, accelerator_name(), ds_source)
    resolve_ep_size(ds_raw, run, ds_source)  # a malformed expert_parallel section fails here, before any file
    plans = plan_stages(run, stages)
    check_batch_fits(run)
    identity = run_identity(run)
    claim = claim_run_dir(Path(run.out_dir), identity, force)
    barrier()  # every rank has checked the folder before rank 0 writes or moves anything there
    if claim == "force":
        if rank == 0:
            moved = supersede(Path(run.out_dir))
            if moved is not None:
                print(
                    f"retrain: --force: the earlier files of {run.out_dir} were moved to {moved}", flush=True
                )
        barrier()
    todo = [p for p in plans if not p.done()]
    if todo and (Path(run.out_dir) / STOP_FILE).exists():
        raise ValueError(
            f"{Path(run.out_dir) / STOP_FILE} exists: a stop request (pre-emption, or by hand) is pending; "
            "remove it to start or resume training"
        )
    if todo and run.checkpoint.resume == "required" and latest_tag(todo[0].ckpt_dir) is None:
        raise ValueError(
            f"checkpoint.resume is 'required' but {todo[0].ckpt_dir} holds no checkpoint (no 'latest' "
            "file); use resume auto, or point out_dir at the interrupted run"
        )
    for plan in todo:  # before any model is loaded: this rank's RNG file of the checkpoint it resumes
        tag = latest_tag(plan.ckpt_dir)
        if tag is not None:
            rng.check_no_legacy(plan.ckpt_dir / tag, rank)
    inputs = stage_inputs(run)
    produced = set()
    for plan in todo:  # every input must exist now or be made earlier in this launch
        src = inputs[plan.stage.name]
        if src is None:
            raise ValueError(
                "run config: model.path is empty; point it at a MoE checkpoint from `dive-ds reconstruct`"
            )
        if src not in produced:
            if (
                not (src / "config.json").is_file()
                and src.name == "model"
                and src.parent.parent.name == "stages"
            ):
                raise ValueError(
                    f"stage {plan.stage.name} starts from stage {src.parent.name}'s output {src}, which "
                    f"does not exist yet; run --stages {src.parent.name} first (or set "
                    f"stages.{plan.stage.name}.init_from)"
                )
            check_moe_folder(src, f"stages.{plan.stage.name} input")
        produced.add(plan.model_dir)
    if not todo:
        if rank == 0:
            print(f"retrain: every stage of {run.out_dir} is already done", flush=True)
    ref = inputs[todo[0].stage.name] if todo else inputs[plans[0].stage.name]
    config = DiveMoeConfig.from_pretrained(ref) if todo else None
    vocab = config.vocab_size if config is not None else 1 << 62
    ep = launch_ep_size(ds_raw, run, world, config.num_local_experts, ds_source) if todo else None
    ep_size = ep["size"] if ep and ep["size"] and ep["size"] > 1 else None  # 1: every rank all experts
    for plan in todo:
        check_ep_stage(plan.stage, int(ds.get("zero_optimization", {}).get("stage", 0)), ep_size)
        if (tag := latest_tag(plan.ckpt_dir)) is not None:
            check_resume_ep_size(plan.ckpt_dir, tag, ep_size)
    tokenizer = load_tokenizer(run.data.tokenizer, ref, vocab) if todo else None
    domains, probs = resolve_domains(run.data)
    evaluates = run.eval.at_start or run.eval.at_end or run.eval.every > 0
    windows = eval_windows(run, tokenizer, vocab) if todo and evaluates else {}
    recipe = data_recipe(run.data, domains, probs, tokenizer) if todo else {}
    if rank == 0:
        write_identity(Path(run.out_dir), identity)
        if ep and ep["note"]:
            print(f"retrain: {ep['note']}", flush=True)
        _record_run(
            run, ds, ds_source, world, recipe, argv, ep and {k: v for k, v in ep.items() if k != "note"}
        )
        print(
            f"retrain: {world} rank(s) on {accelerator_name()}"
            f"{f', expert parallel {ep_size}' if ep_size else ''}; global batch {run.train.global_batch_size} x "
            f"{run.data.seq_len} tokens; stages {', '.join(p.stage.name for p in plans)}; out {run.out_dir}",
            flush=True,
        )
    barrier()
    results: dict[str, dict] = {}
    for plan in plans:
        if plan.done():
            if rank == 0:
                print(f"[{plan.stage.name}] already done ({plan.model_dir}); skipping", flush=True)
            results[plan.stage.name] = json.loads((plan.model_dir / DONE_FILE).read_text())
            continue
        stage_in = check_moe_folder(inputs[plan.stage.name], f"stages.{plan.stage.name} input")
        results[plan.stage.name] = run_stage(
            run, plan, stage_in, ds, rank, world, windows, tokenizer, ep_size
        )
    last = run.enabled_stages()[-1]
    last_dir = Path(run.out_dir) / "stages" / last.name / "model"
    if rank == 0 and (last_dir / DONE_FILE).is_file():
        _link_tree(last_dir, Path(run.out_dir) / "model")
        final = Path(run.out_dir) / "model"
        print(f"retrain: final model -> {final}", flush=True)
        from dive_ds.io.shards import is_sharded

        if is_sharded(final):
            print(
                f"retrain: it is sharded by expert (expert parallelism); one HF folder: "
                f"dive-ds consolidate --shards {final} --out HF_DIR",
                flush=True,
            )
    barrier()
    return results


def retrain(
    config_path: str | None,
    ds_path: str,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    local_rank: int | None = None,
    argv: list[str] | None = None,
    force: bool = False,
) -> dict:
    """The launcher's entry: read configs, initialise the process group, train, always tear down."""
    from dive_ds.train.config_load import load_run_config, read_mapping

    run = load_run_config(config_path, overrides)
    ds_raw = read_mapping(ds_path, "DeepSpeed config")
    setup_distributed(local_rank)
    try:
        return train(run, ds_raw, ds_path, stages, argv, force)
    finally:
        teardown_distributed()
