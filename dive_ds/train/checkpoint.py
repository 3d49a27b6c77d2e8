"""Stage checkpoints: save, load, the commit protocol (STAGE_META, then `latest`), tags, and the
trainable tensors of expert-parallel runs. RNG states: dive_ds.train.rng."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dive_ds.io import atomic
from dive_ds.parallel.distributed import barrier
from dive_ds.train import rng
from dive_ds.train.config import RunConfig, StageConfig
from dive_ds.train.faults import crash_point
from dive_ds.train.planning import StagePlan

logger = logging.getLogger(__name__)


TAG_RE = re.compile(r"^step_(\d+)$")


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


STAGE_META = "dive_ds_stage.json"
"""Written by rank 0 into a tag folder once every rank's files are on disk: the checkpoint's commit mark."""


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (ckpt_dir / tag / STAGE_META).is_file()


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: the one `latest` names, or else the newest committed tag.

    `latest` is written only after a checkpoint is committed (see save_checkpoint), so a tag that
    was being written when the job was killed is never named by it; a `latest` from elsewhere that
    names an incomplete tag falls back to the newest complete one.
    """
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(ckpt_dir, tag):
            return tag
    done = [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)]
    return done[-1] if done else None


def check_resume_ep_size(ckpt_dir: Path, tag: str, ep_size: int | None) -> None:
    """Refuse (one line) to resume a checkpoint saved with another expert-parallel size: its expert
    parameters and optimizer state are split differently. The size follows the launch, so this is
    what a relaunch on another number of ranks meets."""
    saved = json.loads((ckpt_dir / tag / STAGE_META).read_text()).get("ep_size") or None
    if saved != (ep_size or None):
        raise ValueError(
            f"{ckpt_dir / tag} was saved with expert parallel {saved or 1} and this launch has {ep_size or 1}; "
            f"relaunch with the ranks it was saved with (or --set parallel.ep_size={saved or 1} where that "
            "divides the ranks), or start a new out_dir"
        )


def incomplete_tags(ckpt_dir: Path) -> list[str]:
    """Tag folders newer than the latest complete checkpoint: saves a kill interrupted."""
    good = latest_tag(ckpt_dir)
    tags = list_tags(ckpt_dir)
    after = tags[tags.index(good) + 1 :] if good in tags else tags
    return [t for t in after if not is_complete(ckpt_dir, t)]


@contextlib.contextmanager
def _generic_checkpointing(engine, ep: bool):
    """Expert-parallel DIVE layers checkpoint through DeepSpeed's generic ZeRO path, not its MoE path.

    DeepSpeed 0.19.8's MoE checkpointing of AutoEP layers hard-codes GroupedExperts' w1/w2/w3 and,
    under ZeRO-3, refuses frozen expert weights (DIVE freezes them in both stages). With
    `has_moe_layers` off for the call, each rank's optimizer shard (its partition of every trainable
    parameter, experts included) is saved and restored as is; frozen weights are never saved (they
    are the stage input's) and the trainable values are also written per expert-parallel rank by
    `_save_ep_trainable` for resume and offline consolidation.
    """
    if not ep:
        yield
        return
    saved = engine.has_moe_layers
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = saved


EP_TRAINABLE = "ep_trainable_rank{:03d}.safetensors"
SHARED_TRAINABLE = "shared_trainable.safetensors"


@torch.no_grad()
def _save_ep_trainable(module: nn.Module, folder: Path) -> None:
    """Trainable tensors of an expert-parallel run: shared ones by rank 0, each expert-parallel rank's
    experts by the first rank of its expert-data-parallel group (collective: every rank calls it)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from safetensors.torch import save_file

    from dive_ds.parallel.expert_parallel import ep_block_class

    rank = dist.get_rank()
    expert_of = {}
    for mname, m in module.named_modules():
        if isinstance(m, ep_block_class()):
            for pname, _ in m.experts.named_parameters():
                expert_of[f"{mname}.experts.{pname}"] = m
    shared, experts, ep_rank, first_of_edp = {}, {}, 0, False
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        ctx = GatheredParameters([p], modifier_rank=None) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            block = expert_of.get(name)
            if block is None:
                if rank == 0:
                    shared[name] = p.data.detach().to("cpu", torch.float32).clone()
            else:
                from deepspeed.utils import groups

                ep_rank = block.ep_rank
                first_of_edp = groups._get_expert_data_parallel_rank(block.ep_group_name) == 0
                if first_of_edp:
                    experts[name] = p.data.detach().to("cpu", torch.float32).clone()
    if rank == 0:
        save_file(shared, folder / SHARED_TRAINABLE, metadata={"format": "pt"})
    if experts and first_of_edp:
        save_file(experts, folder / EP_TRAINABLE.format(ep_rank), metadata={"format": "pt"})


def save_checkpoint(engine, ckpt_dir: Path, step: int, client: dict, keep: int, meta: dict) -> str:
    """DeepSpeed save_checkpoint + this rank's RNG states, committed; rank 0 then prunes to the last `keep`.

    Commit order, so that a job killed at any moment (a pre-empted SLURM job whose step is torn down)
    leaves either the new checkpoint or the previous one: every rank writes its files; barrier; rank
    0 writes STAGE_META (the commit mark) and only then `latest` (atomic rename). DeepSpeed's own
    `latest` is switched off (save_latest=False): it would name the tag before our files exist.
    """
    tag = f"step_{step:08d}"
    ep = bool(meta.get("ep_size"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and (ckpt_dir / tag / STAGE_META).exists():
        (ckpt_dir / tag / STAGE_META).unlink()  # rewriting a tag: it is incomplete until committed again
    barrier()
    with _generic_checkpointing(engine, ep):
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state={"dive_ds": client},
            save_latest=False,
            exclude_frozen_parameters=bool(meta.get("exclude_frozen")) or ep,
        )
    if ep:
        _save_ep_trainable(engine.module, ckpt_dir / tag)
    rng.save_rng_state(rng.rng_file(ckpt_dir / tag, rank))  # tensors + JSON, no pickle
    crash_point(str(client.get("stage")), step, "save")
    barrier()
    if rank == 0:
        atomic.write_json(ckpt_dir / tag / STAGE_META, meta)
        atomic.write_text(ckpt_dir / "latest", tag)
        for old in incomplete_tags(ckpt_dir):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for old in list_tags(ckpt_dir)[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def load_checkpoint(
    engine, ckpt_dir: Path, tag: str, frozen_excluded: bool = False, ep: bool = False
) -> dict:
    """Model, optimizer, scheduler (DeepSpeed) and this rank's RNG states -> the dive_ds client state.

    With `frozen_excluded` the checkpoint holds only trainable weights; the frozen ones already loaded
    from the stage input stay (non-strict module load).
    """
    with _generic_checkpointing(engine, ep):
        path, client = engine.load_checkpoint(
            str(ckpt_dir),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not (frozen_excluded or ep),
        )
    if path is None or not client or "dive_ds" not in client:
        raise ValueError(
            f"could not load checkpoint {ckpt_dir / tag} (no DeepSpeed state or dive_ds client state)"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = rng.rng_file(ckpt_dir / tag, rank)
    rng.check_no_legacy(ckpt_dir / tag, rank)
    if rng_file.is_file():
        rng.restore(rng.load_rng_state(rng_file))
    else:
        logger.warning("no RNG state for rank %d in %s (different world size?): RNG not restored", rank, tag)
    return client["dive_ds"]


# --------------------------------------------------------------------------- a stage's checkpoints


def _step(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def _any_rank_failed(failed: bool) -> bool:
    """Every rank's verdict on a checkpoint load, so that all fall back together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failed
    from dive_ds.parallel.distributed import current_device

    flag = torch.tensor([1.0 if failed else 0.0], device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def resume_tag(run: RunConfig, plan: StagePlan, rank: int) -> str | None:
    """The stage's latest complete checkpoint (None: start afresh); a torn save is noted and skipped."""
    tag = latest_tag(plan.ckpt_dir)
    torn = incomplete_tags(plan.ckpt_dir)
    if torn and rank == 0:
        print(
            f"[{plan.stage.name}] note: ignoring {', '.join(torn)} in {plan.ckpt_dir}: its save was interrupted "
            f"(no {STAGE_META}); resuming from {tag or 'the start'}",
            flush=True,
        )
    if tag is not None and run.checkpoint.resume == "never":
        raise ValueError(
            f"checkpoint.resume is 'never' but {plan.ckpt_dir} holds checkpoint {tag}; remove it or "
            "use another out_dir"
        )
    return tag


def resume_stage(
    engine, plan: StagePlan, tag: str, stream, rank: int, ep_size: int | None
) -> tuple[int, int]:
    """Load checkpoint `tag` into the engine and the data stream -> (step, tokens seen).

    A committed checkpoint that cannot be read (a corrupt or truncated file) is named, and the previous
    complete one (checkpoint.keep >= 2 retains it) is loaded instead: it overwrites everything the failed
    load may have set (weights, optimizer, scheduler, RNG, data position). With none left: one-line error.
    """
    stage, steps = plan.stage, plan.steps
    complete = [t for t in list_tags(plan.ckpt_dir) if is_complete(plan.ckpt_dir, t)]
    candidates = [tag] + [t for t in reversed(complete) if TAG_RE.match(t) and _step(t) < _step(tag)]
    for i, current in enumerate(candidates):
        error = None
        try:
            excluded = json.loads((plan.ckpt_dir / current / STAGE_META).read_text()).get(
                "exclude_frozen", False
            )
            client = load_checkpoint(
                engine, plan.ckpt_dir, current, frozen_excluded=excluded, ep=bool(ep_size)
            )
        except Exception as e:  # noqa: BLE001 (any unreadable file: report it, fall back)
            error = e
        if not _any_rank_failed(error is not None):
            tag = current
            break
        if error is None:
            why = "another rank could not read its files"
        else:
            why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        where = plan.ckpt_dir / current
        if i + 1 == len(candidates):
            raise ValueError(
                f"checkpoint {where} cannot be loaded ({why}) and no earlier complete checkpoint is left; "
                "restore it, or move the stage's checkpoints folder away to restart the stage"
            )
        if rank == 0:
            print(
                f"[{stage.name}] warning: checkpoint {where} cannot be loaded ({why}); falling back to "
                f"{plan.ckpt_dir / candidates[i + 1]}",
                flush=True,
            )
    if client["stage"] != stage.name:
        raise ValueError(
            f"checkpoint {plan.ckpt_dir / tag} belongs to stage {client['stage']!r}, not {stage.name!r}"
        )
    start, tokens_seen = int(client["step"]), int(client["tokens_seen"])
    stream.load_state_dict(client["data"])
    if client.get("steps") != steps and rank == 0:
        print(
            f"[{stage.name}] note: the checkpoint was made for {client.get('steps')} steps, this run has {steps}"
        )
    if rank == 0:
        print(f"[{stage.name}] resumed from {plan.ckpt_dir / tag} at step {start}", flush=True)
    return start, tokens_seen


def stage_meta(
    run: RunConfig,
    stage: StageConfig,
    input_dir: Path,
    steps: int,
    world: int,
    zero_stage: int,
    ep_size: int | None,
) -> dict:
    """What consolidating a checkpoint needs besides the weights (it also gets the model's config.json).
    The stage input is recorded by absolute path and fingerprint: consolidation reads its frozen weights
    and tokenizer from any working directory, and refuses another model found at that path."""
    from dive_ds.io.fingerprint import input_record

    source = input_record(input_dir)
    return {
        "stage": stage.name,
        "input": source["path"],
        "input_fingerprint": source["fingerprint"],
        "steps": steps,
        "world_size": world,
        "zero_stage": zero_stage,
        "ep_size": ep_size,
        "exclude_frozen": run.checkpoint.exclude_frozen,
        "lora": {"r": stage.lora_r, "alpha": stage.lora_alpha, "dropout": stage.lora_dropout}
        if stage.lora
        else None,
    }


def save_if_due(
    engine, run: RunConfig, plan: StagePlan, step: int, tokens_seen: int, stream, stop: bool, meta: dict,
    rank: int, input_dir: Path,
) -> bool:  # fmt: skip
    """Save a checkpoint when one is due (every checkpoint.every steps, the last step, a stop) -> saved."""
    client = {
        "stage": plan.stage.name,
        "step": step,
        "steps": plan.steps,
        "tokens_seen": tokens_seen,
        "data": stream.state_dict(),
    }
    due = run.checkpoint.every and step % run.checkpoint.every == 0
    if not (due or step == plan.steps or stop):
        return False
    save_checkpoint(engine, plan.ckpt_dir, step, client, run.checkpoint.keep, meta)
    if rank == 0:
        shutil.copy2(input_dir / "config.json", plan.ckpt_dir / f"step_{step:08d}" / "config.json")
    return True
