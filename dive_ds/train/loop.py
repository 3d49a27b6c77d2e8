"""DIVE retraining with DeepSpeed: stages, engine, checkpoints, resume, consolidation, TensorBoard.

A run is a sequence of stages (router -> experts -> optional continue). Each stage:
1. loads its input (model.path, or the previous stage's output) with from_pretrained (under
   `HfDeepSpeedConfig` for ZeRO-3, so each rank materialises its partition of the REAL weights)
   and checks the parameter statistics;
2. sets routing and trainables (router: dense tempered routing, routers only; experts: sparse
   noisy top-k, expert LoRA + routers + RMSNorms), prints the trainable fraction;
3. builds a DeepSpeed engine (optimizer from the JSON with `torch_adam`, the stage's lr schedule
   as a LambdaLR) and resumes from the stage's latest checkpoint when there is one;
4. trains; every K steps `save_checkpoint` (model, optimizer, scheduler; plus the data position,
   step, tokens and every rank's python/numpy/torch RNG states), keeping the last M;
5. at the end gathers the full weights from the live engine (GatheredParameters under ZeRO-3),
   merges LoRA and writes a plain HF checkpoint (safetensors) to OUT/stages/<name>/model.
The last stage's output is linked to OUT/model.

Data parallelism: every rank reads the whole global batch from the (deterministic) stream and
keeps its micro batches; with `rng_per_micro_batch` the router noise and dropout of micro batch m
depend on (seed, step, m) only, so 1 rank and N ranks see the same randomness.

Legend: G global batch (sequences), S sequence length, V vocabulary, L layers, E experts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from dive_ds.models.loading import check_complete, load_causal_lm
from dive_ds.models.lora import (
    add_expert_lora,
    lora_settings_from_state_dict,
    merge_expert_lora,
    merged_weight,
)
from dive_ds.models.moe import DiveMoeBlock, DiveMoeConfig, DiveMoeForCausalLM, moe_blocks, set_router_mode
from dive_ds.models.shards import write_text_atomic
from dive_ds.outputs import check_not_input, claim_output, read_identity
from dive_ds.reconstruct import SIDE_FILES
from dive_ds.train import rng
from dive_ds.train.config import (
    STAGE_ORDER,
    RunConfig,
    StageConfig,
    resolve_ds_config,
    resolve_ep_size,
    stage_ds_config,
    stage_steps,
    stage_temperature,
)
from dive_ds.train.data import build_stream, data_recipe, heldout_windows, load_tokenizer, resolve_domains
from dive_ds.train.metrics import BalanceLoss, StepAccumulator, TopKLoadProbe, TrainLogger, load_cv

logger = logging.getLogger(__name__)

CRASH_ENV = "DIVE_DS_TEST_CRASH_AFTER_STEP"
"""Test hook: `N` or `STAGE:N` makes every rank exit abruptly (os._exit) right after step N;
`STAGE:N:save` does it inside step N's checkpoint save, after the files and before the commit."""
DONE_FILE = "retrain_stage.json"
TOKENIZER_FILES = (*SIDE_FILES, "dive_experts.json")
"""Files besides weights and config that a stage output carries over from its input."""
TAG_RE = re.compile(r"^step_(\d+)$")


class Interrupted(Exception):
    """A SIGTERM/SIGINT arrived; a checkpoint was saved; relaunch to resume."""


# --------------------------------------------------------------------------- distributed


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


# --------------------------------------------------------------------------- model


def check_moe_folder(path: str | Path, what: str = "model.path") -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{what}: {path} is not a Hugging Face model folder (no config.json); "
            "point it at a MoE checkpoint from `dive-ds reconstruct`"
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "dive_moe":
        raise ValueError(
            f"{what}: {path} is a {model_type!r} model, not dive_moe; run `dive-ds reconstruct` "
            "first and retrain its output"
        )
    from dive_ds.models.shards import is_sharded

    if not is_sharded(path):  # a sharded folder is checked by its reader (ShardedMoe)
        check_complete(path)  # every weight there: none would be initialised at random
    return path


def load_model(path: Path, ds_config: dict, zero3_init: bool):
    """from_pretrained with real weights -> (model, keep-alive). For ZeRO-3 with zero3_init the
    returned HfDeepSpeedConfig must stay alive until the engine exists (it makes transformers load
    each rank's partition inside zero.Init)."""
    from transformers import AutoModelForCausalLM

    from dive_ds.models.shards import is_sharded

    if is_sharded(path):
        raise ValueError(
            f"{path} is a sharded MoE (reconstruct --shards): retrain it with expert parallelism "
            "(parallel.ep_size > 1 or expert_parallel.autoep_size), or make one HF folder first with "
            "`dive-ds consolidate --shards`"
        )
    check_complete(path)
    keep = None
    if zero3_init and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = load_causal_lm(path, AutoModelForCausalLM, precheck=False, dtype=torch.float32)
    if not isinstance(model, DiveMoeForCausalLM):
        raise ValueError(f"{path} loaded as {type(model).__name__}, not DiveMoeForCausalLM")
    return model, keep


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


@torch.no_grad()
def check_parameter_stats(model: nn.Module, bound: float) -> dict:
    """Every parameter finite and |w| < bound, checked on each rank's partition, reduced over ranks.

    Catches weights from uninitialised memory (a bare zero.Init) that a falling loss would hide.
    """
    names, stats = [], []
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", p.data)  # ZeRO-3: this rank's partition
        local = local.float()
        nonfinite = (~torch.isfinite(local)).sum().item() if local.numel() else 0
        finite = local[torch.isfinite(local)] if nonfinite else local
        absmax = finite.abs().max().item() if finite.numel() else 0.0
        names.append(name)
        stats.append([float(nonfinite), absmax])
    t = torch.tensor(stats, dtype=torch.float64)
    if dist.is_initialized():
        sums, maxs = t[:, 0].clone(), t[:, 1].clone()
        dist.all_reduce(sums)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
        t = torch.stack([sums, maxs], dim=1)
    bad = [(n, s) for n, s in zip(names, t.tolist()) if s[0] > 0]
    if bad:
        raise ValueError(
            f"parameter {bad[0][0]} has {int(bad[0][1][0])} non-finite values after loading; "
            "the checkpoint is corrupt or was not loaded"
        )
    worst = int(t[:, 1].argmax())
    if t[worst, 1] >= bound:
        raise ValueError(
            f"parameter {names[worst]} has |w| = {t[worst, 1]:.3g} >= {bound:g} after loading "
            "(uninitialised memory?); check the checkpoint or raise model.max_abs_weight"
        )
    return {
        "parameters": len(names),
        "max_abs": float(t[:, 1].max()),
        "max_abs_name": names[worst],
        "zero3_partitioned": sum(1 for p in model.parameters() if hasattr(p, "ds_id")),
    }


def param_kind(name: str) -> str:
    if ".lora_" in name:
        return "lora"
    if ".mlp.gate.noise_weight" in name:
        return "router_noise"
    if ".mlp.gate." in name:
        return "router"
    if name.endswith(".mlp.experts.bias"):
        return "expert_bias"
    if ".mlp.experts." in name:
        return "experts"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norm"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    return "other"


def trainable_kinds(stage: StageConfig, noise_on: bool) -> set[str]:
    kinds = set()
    if stage.lora:
        kinds.add("lora")
    if stage.train_router:
        kinds.add("router")
        if stage.router_mode == "sparse" and noise_on:
            kinds.add("router_noise")  # dense routing never uses the noise weights (they would get no grad)
    if stage.train_norms:
        kinds.add("norm")
    if stage.train_expert_bias:
        kinds.add("expert_bias")
    if stage.unfreeze_attention:
        kinds.add("attention")
    if stage.unfreeze_embeddings:
        kinds.add("embeddings")
    return kinds


def prepare_stage_model(model: DiveMoeForCausalLM, stage: StageConfig, seed: int) -> dict:
    """Routing mode, LoRA and requires_grad for a stage (in place) -> trainable counts per kind."""
    top_k = model.config.num_experts_per_tok
    if stage.router_mode == "dense":
        set_router_mode(model, "dense", stage_temperature(stage, top_k))
    else:
        set_router_mode(model, "sparse")
    noise_on = stage.router_noise and model.config.router_noise and model.config.router_noise_scale > 0
    if stage.router_gate is not None:
        model.config.router_gate = stage.router_gate
    for block in moe_blocks(model):
        block.gate.noise = bool(noise_on)
        block.gate.gate_kind = model.config.router_gate
    if stage.lora:
        add_expert_lora(
            model,
            r=stage.lora_r,
            alpha=stage.lora_alpha,
            dropout=stage.lora_dropout,
            seed=seed + STAGE_ORDER.index(stage.name),
        )
    kinds = trainable_kinds(stage, bool(noise_on))
    counts: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        kind = param_kind(name)
        p.requires_grad_(kind in kinds)
        total += _numel(p)
        if kind in kinds:
            counts[kind] = counts.get(kind, 0) + _numel(p)
    if not counts:
        raise ValueError(f"stage {stage.name}: nothing to train (check lora / train_router / train_norms)")
    return {"total": total, "trainable": sum(counts.values()), "by_kind": counts}


def trainable_line(stage: str, counts: dict) -> str:
    frac = 100.0 * counts["trainable"] / counts["total"]
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts["by_kind"].items()))
    return f"[{stage}] trainable parameters: {counts['trainable']:,} of {counts['total']:,} ({frac:.3f}%): {parts}"


# --------------------------------------------------------------------------- schedule


def lr_factor(stage: StageConfig, steps: int):
    """LambdaLR factor after `s` optimizer steps: linear warm-up to 1, then constant or cosine to min_lr_ratio."""
    warmup = math.ceil(stage.warmup_ratio * steps) if stage.warmup_ratio > 0 else 0

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if stage.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- loss, eval


def causal_lm_loss(logits_BSV: torch.Tensor, ids_BS: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a packed batch (every position but the last predicts the next token)."""
    logits = logits_BSV[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids_BS[:, 1:].reshape(-1), reduction=reduction
    )


def _micro_seed(seed: int, stage_index: int, step: int, micro: int) -> int:
    return int(np.random.default_rng([seed, stage_index, step, micro]).integers(0, 2**63 - 1))


@contextlib.contextmanager
def _sparse_eval(module: DiveMoeForCausalLM):
    """Eval mode with inference routing (sparse top-k, no noise); the training setup comes back after."""
    blocks = moe_blocks(module)
    saved = [(b.gate.mode, b.gate.temperature) for b in blocks]
    saved_cfg = (module.config.router_mode, module.config.router_temperature)
    was_training = module.training
    module.eval()
    for b in blocks:
        b.gate.mode = "sparse"
    try:
        yield
    finally:
        for b, (mode, temp) in zip(blocks, saved):
            b.gate.mode, b.gate.temperature = mode, temp
        module.config.router_mode, module.config.router_temperature = saved_cfg
        module.train(was_training)


@torch.no_grad()
def evaluate(
    forward, windows: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> dict[str, dict]:
    """Held-out NLL per domain, windows sharded over ranks -> {domain: {loss, ppl, tokens}}.

    Every rank runs the same number of forwards (ZeRO-3 gathers are collective): a rank short of
    batches repeats one and ignores its result.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    sums = torch.zeros(len(windows), 2, dtype=torch.float64)
    for d, w in enumerate(windows.values()):
        batches = [w[i : i + batch_size] for i in range(0, w.shape[0], batch_size)]
        for j in range(math.ceil(len(batches) / world)):
            b = j * world + rank
            ids = batches[b if b < len(batches) else 0].to(device)
            nll = causal_lm_loss(forward(ids), ids, reduction="sum")
            if b < len(batches):
                sums[d, 0] += nll.item()
                sums[d, 1] += ids[:, 1:].numel()
    if dist.is_initialized():
        dist.all_reduce(sums)
    out = {}
    for (name, _), (nll, n) in zip(windows.items(), sums.tolist()):
        out[name] = {"loss": nll / n, "ppl": math.exp(min(nll / n, 50.0)), "tokens": int(n)}
    return out


def eval_windows(run: RunConfig, tokenizer, model_vocab: int) -> dict[str, torch.Tensor]:
    """{domain: [n, S] token windows}: from eval.calib_dir, else from the training domains' held-out documents."""
    e = run.eval
    if e.calib_dir:
        from dive_ds.calibrate import load_calibration

        cal = load_calibration(e.calib_dir)
        windows = {n: w[: e.windows_per_domain] for n, w in cal.eval.items()}
    else:
        domains, _ = resolve_domains(run.data)
        seq_len = e.seq_len or run.data.seq_len
        windows = {
            d.name: heldout_windows(d, tokenizer, seq_len, e.windows_per_domain, run.data.holdout_every)
            for d in domains
        }
        windows = {n: w for n, w in windows.items() if w.shape[0] > 0}
        if not windows:
            raise ValueError(
                "no held-out evaluation windows: the held-out documents are shorter than one window; "
                "lower eval.seq_len, lower data.holdout_every or set eval.calib_dir"
            )
    top = max(int(w.max()) for w in windows.values())
    if top >= model_vocab:
        raise ValueError(
            f"evaluation windows hold token id {top} >= the model's vocab_size {model_vocab}: they were "
            "made with another tokenizer"
        )
    return windows


def summarise_eval(result: dict[str, dict]) -> dict:
    tokens = sum(r["tokens"] for r in result.values())
    loss = sum(r["loss"] * r["tokens"] for r in result.values()) / max(tokens, 1)
    return {
        "loss": loss,
        "ppl_mean": float(np.mean([r["ppl"] for r in result.values()])),
        "ppl": {n: r["ppl"] for n, r in result.items()},
        "loss_by_domain": {n: r["loss"] for n, r in result.items()},
    }


# --------------------------------------------------------------------------- checkpoints


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    _barrier()
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
    _crash_point(str(client.get("stage")), step, "save")
    _barrier()
    if rank == 0:
        write_text_atomic(json.dumps(meta, indent=2) + "\n", ckpt_dir / tag / STAGE_META)
        write_text_atomic(tag, ckpt_dir / "latest")
        for old in incomplete_tags(ckpt_dir):
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        for old in list_tags(ckpt_dir)[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
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


@torch.no_grad()
def gather_state_dict(module: nn.Module, skip_ep_experts: bool = False) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU state dict of the live model on rank 0 (None elsewhere).

    ZeRO-3 parameters are gathered one at a time with deepspeed.zero.GatheredParameters
    (collective: every rank must call this); ZeRO-0/1/2 parameters are already whole.
    With `skip_ep_experts` the experts of expert-parallel blocks are left out (see local_expert_state).
    """
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    ep_groups = _ep_groups_of(module)
    for name, p in module.named_parameters():
        if skip_ep_experts and name in ep_groups:
            continue
        ctx = GatheredParameters([p], modifier_rank=None) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            data = p.data.detach().to("cpu", torch.float32)
            group = ep_groups.get(name)
            if (
                group is not None
            ):  # an expert-parallel rank holds experts [r*E/P, (r+1)*E/P): stack in rank order
                parts = [torch.empty_like(data) for _ in range(dist.get_world_size(group=group))]
                dist.all_gather(parts, data.contiguous(), group=group)
                data = torch.cat(parts, dim=0)
            if out is not None:
                out[name] = data.clone()
    if out is not None:
        for name, b in module.named_buffers():
            short = name.rsplit(".", 1)[-1]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if short not in owner._non_persistent_buffers_set:
                out[name] = b.detach().to("cpu").clone()
    return out


def _ep_groups_of(module: nn.Module) -> dict[str, object]:
    """{parameter name: expert-parallel group} for the expert parameters of ep_size > 1 blocks."""
    from dive_ds.parallel.expert_parallel import ep_block_class

    out = {}
    for mname, m in module.named_modules():
        if isinstance(m, ep_block_class()) and m.ep_size > 1:
            for pname, _ in m.experts.named_parameters():
                out[f"{mname}.experts.{pname}"] = m.ep_group
    return out


@torch.no_grad()
def local_expert_state(module: nn.Module, lora: dict | None) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """{layer: {expert id: {gate_up_proj, down_proj[, bias]}}}: this rank's experts of every
    expert-parallel block, fp32 on CPU, LoRA merged. ZeRO-3 partitions are gathered over the
    expert-data-parallel group (collective: every rank calls this)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from dive_ds.parallel.expert_parallel import ep_block_class

    out: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for mname, m in module.named_modules():
        if not (isinstance(m, ep_block_class()) and m.ep_size > 1):
            continue
        layer = int(mname.split("layers.")[1].split(".")[0])
        tensors = {}
        for pname, p in m.experts.named_parameters():
            ctx = (
                GatheredParameters([p], modifier_rank=None)
                if hasattr(p, "ds_id")
                else contextlib.nullcontext()
            )
            with ctx:
                tensors[pname] = p.data.detach().to("cpu", torch.float32).clone()
        if lora is not None:
            scale = float(lora["alpha"]) / int(lora["r"])
            for w, b, a in (
                ("gate_up_proj", "lora_gate_up_B", "lora_gate_up_A"),
                ("down_proj", "lora_down_B", "lora_down_A"),
            ):
                tensors[w] = merged_weight(tensors[w], tensors.pop(b), tensors.pop(a), scale)
        ids = m.experts.expert_ids
        out[layer] = {e: {k: v[i].contiguous() for k, v in tensors.items()} for i, e in enumerate(ids)}
    return out


def export_sharded(
    shared: dict[str, torch.Tensor] | None,
    experts: dict[int, dict[int, dict[str, torch.Tensor]]],
    config_dir: Path,
    out: Path,
    ep_size: int,
    info: dict,
) -> Path:
    """An expert-parallel stage's output as a sharded MoE folder (dive_ds.models.shards), written by
    every rank at once: rank 0 the shared tensors (`shared`, from gather_state_dict(skip_ep_experts=True)),
    config and tokenizer; each expert by the first rank that holds it. No rank ever holds every
    expert. DONE_FILE is written last, once every rank's marker is there. Collective."""
    from dive_ds.models.shards import ShardedMoe, ShardWriter

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = DiveMoeConfig.from_pretrained(config_dir)
    if rank == 0 and out.exists():
        shutil.rmtree(out)  # an unfinished earlier export of this stage
    _barrier()
    # every rank is a "node" of one GPU: the placement (ep_rank = rank % P) is DeepSpeed's
    writer = ShardWriter(out, config, config.num_local_experts, ep_size, world, 1, rank)
    if rank == 0:
        assert shared is not None
        layers: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(config.num_hidden_layers)}
        top = {}
        for name, value in shared.items():
            if name.startswith("model.layers."):
                layers[int(name.split(".")[2])][name] = value.contiguous()
            elif not (name == "lm_head.weight" and config.tie_word_embeddings):
                top[name] = value.contiguous()
        writer.write_shared(top)
        for layer, tensors in layers.items():
            writer.write_shared_layer(layer, tensors)
        for fname in TOKENIZER_FILES:
            if (config_dir / fname).is_file():
                writer.copy_file(config_dir / fname)
    for expert in writer.experts:
        for layer in range(config.num_hidden_layers):
            writer.write_expert(layer, expert, experts[layer][expert])
    writer.finish()
    _barrier()
    if rank == 0:
        ShardedMoe(out)  # every node marker and file is there
        write_text_atomic(json.dumps(info, indent=2) + "\n", out / DONE_FILE)
    _barrier()
    return out


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config_dir: Path,
    out: Path,
    lora: dict | None,
    info: dict,
    files_from: Path | None = None,
) -> Path:
    """Plain DIVE MoE checkpoint (LoRA merged, sparse routing config) from a full state dict; atomic."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(config_dir)
    if not isinstance(config, DiveMoeConfig):
        raise ValueError(f"{config_dir} does not hold a dive_moe config")
    with no_init_weights():  # every weight comes from the state dict
        model = DiveMoeForCausalLM(config)
    if lora is not None:
        add_expert_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=0.0)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"state dict does not fit {config_dir}: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    merge_expert_lora(model)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        source = files_from or config_dir
        for fname in TOKENIZER_FILES:
            if (source / fname).exists() and not (tmp / fname).exists():
                shutil.copy2(source / fname, tmp / fname)
        (tmp / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ep_checkpoint_state(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Trainable tensors of an expert-parallel checkpoint: the shared file plus every expert-parallel
    rank's experts stacked in rank order (DeepSpeed's zero_to_fp32 cannot merge per-rank expert groups)."""
    from safetensors.torch import load_file

    ep = int(meta["ep_size"])
    missing = [
        n
        for n in [SHARED_TRAINABLE] + [EP_TRAINABLE.format(r) for r in range(ep)]
        if not (folder / n).is_file()
    ]
    if missing:
        raise ValueError(
            f"{folder}: expert-parallel checkpoint is incomplete (no {missing[0]}); use another tag"
        )
    state = load_file(folder / SHARED_TRAINABLE)
    parts = [load_file(folder / EP_TRAINABLE.format(r)) for r in range(ep)]
    for name in parts[0]:
        state[name] = torch.cat([p[name] for p in parts], dim=0)
    return state


def consolidate_checkpoint(
    ckpt_dir: str | Path, out: str | Path, tag: str | None = None, force: bool = False
) -> Path:
    """A DeepSpeed ZeRO-2/3 checkpoint of a stage -> plain HF MoE folder, offline (zero_to_fp32).

    `ckpt_dir` is OUT/stages/<name>/checkpoints (tag: the latest) or one tag folder inside it. An `out`
    holding this same consolidation is reused; anything else there is refused unless `force`.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = Path(ckpt_dir)
    if TAG_RE.match(ckpt_dir.name) and tag is None:
        ckpt_dir, tag = ckpt_dir.parent, ckpt_dir.name
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise ValueError(f"no dive_ds checkpoint in {ckpt_dir} (expected a 'latest' file and step_* folders)")
    if not is_complete(ckpt_dir, tag):
        raise ValueError(
            f"{ckpt_dir / tag} is incomplete (no {STAGE_META}: its save was interrupted); consolidate "
            "an earlier step_* folder or the stage's checkpoints folder"
        )
    meta = json.loads((ckpt_dir / tag / STAGE_META).read_text())
    out = Path(out)
    check_not_input(out, {"checkpoint": ckpt_dir / tag, "stage input": meta.get("input")})
    identity = {  # the checkpoint, and its commit record (step, input, settings) as written
        "checkpoint": str((ckpt_dir / tag).resolve()),
        "stage_meta_sha256": hashlib.sha256((ckpt_dir / tag / STAGE_META).read_bytes()).hexdigest()[:16],
    }
    recorded = read_identity(out / DONE_FILE) if (out / "config.json").is_file() else None
    if claim_output(out, identity, recorded, DONE_FILE, force):
        print(f"{out} already holds this consolidation of {ckpt_dir / tag}; reusing it", flush=True)
        return out
    if meta.get("ep_size"):
        state = _ep_checkpoint_state(ckpt_dir / tag, meta)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    if meta.get("exclude_frozen") or meta.get(
        "ep_size"
    ):  # frozen weights are the stage input's: read them from there
        source = Path(meta["input"])
        if not (source / "config.json").is_file():
            raise ValueError(
                f"{ckpt_dir / tag} was saved without frozen weights, which come from the stage input "
                f"{source}; that folder is gone: restore it to consolidate"
            )
        from dive_ds.models.shards import ShardedMoe, is_sharded

        if is_sharded(source):
            sharded = ShardedMoe(source)
            full = sharded.shared_state()
            experts = list(range(sharded.config.num_local_experts))
            for layer in range(sharded.config.num_hidden_layers):
                for key, value in sharded.expert_tensors(layer, experts).items():
                    full[f"model.layers.{layer}.mlp.experts.{key}"] = value
            state = {k: v.float() for k, v in full.items()} | state
        else:
            from dive_ds.models.loading import LayerwiseCheckpoint

            base = LayerwiseCheckpoint(source)
            state = {k: base.get(k).float() for k in base.keys()} | state
    rank = lora_settings_from_state_dict(state)
    lora = meta.get("lora") if rank is not None else None
    return export_hf(
        state,
        ckpt_dir / tag,
        Path(out),
        lora,
        {
            "consolidated_from": str(ckpt_dir / tag),
            "stage": meta.get("stage"),
            "tag": tag,
            "identity": identity,
        },
        files_from=Path(meta["input"]) if Path(meta.get("input", "")).is_dir() else None,
    )


# --------------------------------------------------------------------------- stage


@dataclass
class StagePlan:
    stage: StageConfig
    index: int
    steps: int
    step_offset: int
    """Global TensorBoard step of this stage's step 0 (sum of earlier enabled stages' steps)."""
    dir: Path

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def done(self) -> bool:
        return (self.model_dir / DONE_FILE).is_file()


def plan_stages(run: RunConfig, only: list[str] | None = None) -> list[StagePlan]:
    if only:
        unknown = [s for s in only if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(
                f"--stages {','.join(only)}: unknown stage {unknown[0]!r}; use {', '.join(STAGE_ORDER)}"
            )
        disabled = [s for s in only if not run.stage(s).enabled]
        if disabled:
            raise ValueError(
                f"--stages: stage {disabled[0]!r} is disabled in the run config; set "
                f"stages.{disabled[0]}.enabled=true"
            )
    plans, offset = [], 0
    for stage in run.enabled_stages():
        steps = stage_steps(stage, run.train, run.data)
        if not only or stage.name in only:
            plans.append(
                StagePlan(
                    stage,
                    STAGE_ORDER.index(stage.name),
                    steps,
                    offset,
                    Path(run.out_dir) / "stages" / stage.name,
                )
            )
        offset += steps
    if not plans:
        raise ValueError("no stage to run: enable at least one of stages.router / experts / continue")
    return plans


STOP_FILE = "STOP"
"""`touch OUT_DIR/STOP`: every rank finishes its step, the stage checkpoints and the launcher exits 143,
as on SIGTERM. The SLURM scripts use it on pre-emption (a signal to the step would reach torchrun
too, which gives its workers only 30 s). A relaunch refuses to start while the file is there."""


class _StopFlag:
    """SIGTERM/SIGINT, or the stop file appearing, asks for a checkpoint and a clean exit."""

    def __init__(self, stop_file: Path | None = None):
        self._signalled = False
        self._file = stop_file
        self._old = {}

    @property
    def set(self) -> bool:
        return self._signalled or (self._file is not None and self._file.exists())

    def install(self) -> None:
        if sys.platform == "win32" or not _main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _crash_spec() -> tuple[str | None, int, str] | None:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    parts = value.split(":")
    if len(parts) == 1:
        return None, int(parts[0]), "step"
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "step"


def _crash_step(stage: str) -> int | None:
    spec = _crash_spec()
    if spec is None or spec[2] != "step" or spec[0] not in (None, stage):
        return None
    return spec[1]


def _crash_point(stage: str, step: int, where: str) -> None:
    spec = _crash_spec()
    if spec is not None and spec[0] in (None, stage) and spec[1] == step and spec[2] == where:
        os._exit(3)  # test hook: die like a killed process, no clean-up


def _param_groups(model: nn.Module, ep_size: int | None, zero_stage: int) -> list:
    """Trainable parameters for the optimizer; with expert parallelism, DeepSpeed's MoE param groups.

    ZeRO-1/2 with MoE layers insists on at least one MoE param group, which the router stage (experts
    frozen) does not have: it gets an empty one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not ep_size:
        return params
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dive"})


ZERO2_EP_FROZEN = (
    "DeepSpeed 0.19.8's ZeRO-1/2 optimizer asserts 'The model has moe layers, but None of the param "
    "groups are marked as MoE' when no expert parameter trains"
)


def check_ep_stage(stage: StageConfig, zero_stage: int, ep_size: int | None) -> None:
    """Refuse, before any work, a stage that DeepSpeed cannot run with expert parallelism."""
    if not ep_size or zero_stage not in (1, 2):
        return
    if not (stage.lora or stage.train_expert_bias):
        raise ValueError(
            f"stage {stage.name} with ZeRO-{zero_stage} and expert parallelism {ep_size}: the experts are "
            f"frozen and {ZERO2_EP_FROZEN}; run this stage with ds_configs/zero3.json (ZeRO-3 + EP) or "
            "without expert parallelism (--set parallel.ep_size=1)"
        )


def run_stage(
    run: RunConfig,
    plan: StagePlan,
    input_dir: Path,
    ds_base: dict,
    rank: int,
    world: int,
    windows: dict[str, torch.Tensor],
    tokenizer,
    ep_size: int | None = None,
) -> dict:
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules
    from tqdm import tqdm

    stage, steps = plan.stage, plan.steps
    ds = stage_ds_config(ds_base, stage)
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    mbs, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    glob, seq_len = run.train.global_batch_size, run.data.seq_len
    device = _device()
    plan.dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (plan.dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    tag = latest_tag(plan.ckpt_dir)
    torn = incomplete_tags(plan.ckpt_dir)
    if torn and rank == 0:
        print(
            f"[{stage.name}] note: ignoring {', '.join(torn)} in {plan.ckpt_dir}: its save was interrupted "
            f"(no {STAGE_META}); resuming from {tag or 'the start'}",
            flush=True,
        )
    if tag is not None and run.checkpoint.resume == "never":
        raise ValueError(
            f"checkpoint.resume is 'never' but {plan.ckpt_dir} holds checkpoint {tag}; remove it or "
            "use another out_dir"
        )

    _seed_all(run.train.seed + plan.index)  # a resumed stage overwrites this with the checkpoint's RNG states
    if ep_size:
        from dive_ds.parallel.ep_model import build_ep_model, ensure_ep_groups

        ep_rank, _ = ensure_ep_groups(ep_size)
        model, keep_alive = build_ep_model(input_dir, ep_size, ep_rank), None
    else:
        model, keep_alive = load_model(input_dir, ds, run.model.zero3_init)
    counts = prepare_stage_model(model, stage, run.train.seed)
    if ep_size:
        from dive_ds.parallel.expert_parallel import retag_model

        retag_model(model)  # LoRA tensors of the experts reduce over the expert-data-parallel group too
    if rank == 0:
        print(trainable_line(stage.name, counts), flush=True)
    if not stage.unfreeze_embeddings:
        # Frozen embeddings leave layer 0's inputs without grad; ZeRO-3's module backward hooks then fire
        # (and release the parameters) before the module's own backward ran. Same fix as PEFT's.
        model.enable_input_require_grads()
    if run.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if zero_stage == 3:
        set_z3_leaf_modules(model, [DiveMoeBlock])  # routing changes the expert order: fetch the block whole
    balance = BalanceLoss(model) if stage.aux_loss_coef > 0 else None
    probe = TopKLoadProbe(model) if stage.router_mode == "dense" else None  # dense: load = inference top-k
    factor = lr_factor(stage, steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, ep_size, zero_stage),
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        dist_init_required=False,
    )
    stats = check_parameter_stats(engine.module, run.model.max_abs_weight)
    module: DiveMoeForCausalLM = engine.module
    blocks = moe_blocks(module)

    stream = build_stream(run.data, tokenizer)
    start, tokens_seen = 0, 0
    if tag is not None:
        excluded = json.loads((plan.ckpt_dir / tag / STAGE_META).read_text()).get("exclude_frozen", False)
        client = load_checkpoint(engine, plan.ckpt_dir, tag, frozen_excluded=excluded, ep=bool(ep_size))
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
    # what consolidating a checkpoint needs besides the weights (it also gets the model's config.json)
    meta = {
        "stage": stage.name,
        "input": str(input_dir),
        "steps": steps,
        "world_size": world,
        "zero_stage": zero_stage,
        "ep_size": ep_size,
        "exclude_frozen": run.checkpoint.exclude_frozen,
        "lora": {"r": stage.lora_r, "alpha": stage.lora_alpha, "dropout": stage.lora_dropout}
        if stage.lora
        else None,
    }
    log = TrainLogger(
        Path(run.out_dir),
        run.logging.tensorboard,
        rank,
        purge_step=plan.step_offset + start + 1 if start else None,
    )
    log.record(
        {
            "event": "stage_start",
            "stage": stage.name,
            "step": start,
            "steps": steps,
            "trainable": counts,
            "param_stats": stats,
            "input": str(input_dir),
            "world_size": world,
            "zero_stage": zero_stage,
            "aux_loss_coef": stage.aux_loss_coef,
        }
    )
    if rank == 0:
        print(
            f"[{stage.name}] {steps} steps x {glob} sequences x {seq_len} tokens = {steps * glob * seq_len:,} tokens; "
            f"micro batch {mbs} x grad accumulation {gas} x {world} rank(s); ZeRO-{zero_stage}; "
            f"lr {stage.lr:g} {stage.schedule}",
            flush=True,
        )

    stop = _StopFlag(Path(run.out_dir) / STOP_FILE)
    stop.install()
    crash_at = _crash_step(stage.name)
    last_saved = start
    heat_counts = torch.zeros(len(blocks), blocks[0].num_experts, dtype=torch.float64)
    bar = tqdm(
        total=steps,
        initial=start,
        desc=stage.name,
        unit="step",
        dynamic_ncols=True,
        disable=rank != 0 or not run.logging.progress,
        file=sys.stdout,
    )
    engine.train()
    result: dict = {}
    try:
        if start == 0 and run.eval.at_start:
            _log_eval(engine, module, windows, run, device, log, plan.step_offset, stage.name, 0)
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            ids_GS, _domains = stream.next_batch(glob)
            mine = ids_GS[rank * gas * mbs : (rank + 1) * gas * mbs]
            acc = StepAccumulator(blocks)
            for i in range(gas):
                if run.train.rng_per_micro_batch:
                    torch.manual_seed(_micro_seed(run.train.seed, plan.index, step, rank * gas + i))
                ids = mine[i * mbs : (i + 1) * mbs].to(device)
                if balance is not None:
                    balance.start()
                logits = engine(input_ids=ids, use_cache=False).logits
                ce = causal_lm_loss(logits, ids)
                loss, aux = ce, None
                if balance is not None:
                    aux = balance.loss()
                    loss = ce + stage.aux_loss_coef * aux
                acc.add(ce.item(), aux.item() if aux is not None else 0.0, probe)
                engine.backward(loss)
                engine.step()
            tokens_seen += glob * seq_len
            grad_norm = engine.get_global_grad_norm()
            red = acc.reduce(time.perf_counter() - t0, stop.set)
            step_time = time.perf_counter() - t0
            tok_s = glob * seq_len / step_time
            gstep = plan.step_offset + step
            heat_counts += red["counts_LE"]
            row = {
                "stage": stage.name,
                "step": step,
                "global_step": gstep,
                "loss": red["loss"],
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_seen": tokens_seen,
                "tokens_per_s": tok_s,
                "step_time_s": step_time,
                "load_cv_mean": float(load_cv(red["counts_LE"]).mean()),
            }
            if balance is not None:
                row |= {"aux_loss": red["aux_loss"], "aux_loss_coef": stage.aux_loss_coef}
            log.record(row)
            if step % run.logging.every == 0 or step == steps:
                scalars = {
                    "train/loss": red["loss"],
                    "train/lr": lr,
                    "train/grad_norm": row["grad_norm"],
                    "train/tokens_seen": tokens_seen,
                    "train/tokens_per_s": tok_s,
                    "train/step_time_s": step_time,
                }
                if balance is not None:
                    scalars |= {"train/aux_loss": red["aux_loss"], "train/aux_loss_coef": stage.aux_loss_coef}
                log.scalars(scalars, gstep)
                log.moe_scalars(red["counts_LE"], red["entropy_L"], gstep, run.logging.per_expert_scalars)
                if not run.logging.progress and rank == 0:
                    print(
                        f"[{stage.name}] step {step}/{steps} loss {red['loss']:.4f} lr {lr:.3g} "
                        f"{tok_s:,.0f} tok/s",
                        flush=True,
                    )
            if run.logging.heatmap_every and step % run.logging.heatmap_every == 0:
                log.heatmap(heat_counts, gstep, f"{stage.name} step {step}: expert load share")
                heat_counts.zero_()
            bar.set_postfix(loss=f"{red['loss']:.4f}", lr=f"{lr:.2g}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)
            if run.eval.every and step % run.eval.every == 0 and step != steps:
                _log_eval(engine, module, windows, run, device, log, gstep, stage.name, step)
            client = {
                "stage": stage.name,
                "step": step,
                "steps": steps,
                "tokens_seen": tokens_seen,
                "data": stream.state_dict(),
            }
            due = run.checkpoint.every and step % run.checkpoint.every == 0
            if due or step == steps or red["stop"]:
                save_checkpoint(engine, plan.ckpt_dir, step, client, run.checkpoint.keep, meta)
                last_saved = step
                if rank == 0:
                    shutil.copy2(
                        input_dir / "config.json", plan.ckpt_dir / f"step_{step:08d}" / "config.json"
                    )
            log.flush()
            if crash_at == step:
                bar.close()
                log.close()
                os._exit(3)  # test hook: die like a killed process, no clean-up
            if red["stop"]:
                raise Interrupted(
                    f"stage {stage.name}: stopped after step {step} (a signal or {Path(run.out_dir) / STOP_FILE}); "
                    "checkpoint saved, relaunch the same command to resume"
                )
        bar.close()
        final = summarise_eval(
            _log_eval(engine, module, windows, run, device, log, plan.step_offset + steps, stage.name, steps)
        )
        log.heatmap(heat_counts, plan.step_offset + steps, f"{stage.name} end: expert load share")
        state = gather_state_dict(module, skip_ep_experts=bool(ep_size))
        local_experts = local_expert_state(module, meta["lora"]) if ep_size else None
        result = {
            "stage": stage.name,
            "steps": steps,
            "tokens_seen": tokens_seen,
            "final_eval": final,
            "trainable": counts,
            "last_checkpoint": f"step_{last_saved:08d}",
        }
    finally:
        bar.close()
        stop.restore()
        for hooks in (balance, probe):
            if hooks is not None:
                hooks.remove()
        log.close()
    del engine, module, model, keep_alive, blocks
    _free_memory()
    if rank == 0 or ep_size:
        info = {
            "stage": stage.name,
            "input": str(input_dir),
            "steps": steps,
            "tokens_seen": tokens_seen,
            "world_size": world,
            "zero_stage": zero_stage,
            "final_eval": result["final_eval"],
            "lora_merged": stage.lora,
            "run_config": run.to_dict(),
        }
        if ep_size:  # every rank writes its experts: no rank gathers the whole MoE
            export_sharded(state, local_experts, input_dir, plan.model_dir, ep_size, info | {"sharded": True})
        else:
            export_hf(state, input_dir, plan.model_dir, meta["lora"], info)
    if rank == 0:
        (plan.dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"[{stage.name}] done: held-out loss {result['final_eval']['loss']:.4f}, mean ppl "
            f"{result['final_eval']['ppl_mean']:.2f}; model -> {plan.model_dir}",
            flush=True,
        )
    _barrier()
    return result


def _log_eval(
    engine, module, windows, run: RunConfig, device, log: TrainLogger, gstep: int, stage: str, step: int
) -> dict:
    with _sparse_eval(module):
        result = evaluate(
            lambda ids: engine(input_ids=ids, use_cache=False).logits, windows, run.eval.batch_size, device
        )
    summary = summarise_eval(result)
    scalars = {f"eval/ppl/{n}": p for n, p in summary["ppl"].items()}
    scalars |= {"eval/loss": summary["loss"], "eval/ppl_mean": summary["ppl_mean"]}
    log.scalars(scalars, gstep)
    log.record({"event": "eval", "stage": stage, "step": step, "global_step": gstep} | summary)
    return result


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- run


def _git_rev() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _versions() -> dict:
    import importlib.metadata as md

    import dive_ds

    out = {"dive_ds": dive_ds.__version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "transformers", "safetensors", "tensorboard"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _record_run(
    run: RunConfig, ds: dict, ds_source: str, world: int, recipe: dict, argv: list[str] | None
) -> None:
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    (out / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    info = {
        "versions": _versions(),
        "git_rev": _git_rev(),
        "world_size": world,
        "accelerator": accelerator_name(),
        "ds_config_source": ds_source,
        "argv": argv or sys.argv,
        "data_recipe": recipe,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    with open(out / "launches.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")


def _link_tree(src: Path, dst: Path) -> None:
    """dst becomes a copy of src made of hard links where possible (no second copy of the weights)."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    shutil.rmtree(tmp)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def stage_inputs(run: RunConfig) -> dict[str, Path | None]:
    """Each enabled stage's input folder: init_from, else the previous enabled stage's output, else model.path."""
    previous = Path(run.model.path) if run.model.path else None
    inputs: dict[str, Path | None] = {}
    for stage in run.enabled_stages():
        inputs[stage.name] = Path(stage.init_from) if stage.init_from else previous
        previous = Path(run.out_dir) / "stages" / stage.name / "model"
    return inputs


def train(
    run: RunConfig,
    ds_raw: dict,
    ds_source: str = "DeepSpeed config",
    stages: list[str] | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Run (or resume) the run's stages on an initialised process group -> {stage: summary}.

    Everything that can be checked without training is checked first (one-line ValueErrors).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    ds = resolve_ds_config(ds_raw, run, world, accelerator_name(), ds_source)
    ep_size = resolve_ep_size(ds_raw, run, ds_source)
    ep_size = ep_size if ep_size and ep_size > 1 else None  # 1: every rank all experts, the plain path
    plans = plan_stages(run, stages)
    for plan in plans:
        if not plan.done():
            check_ep_stage(plan.stage, int(ds.get("zero_optimization", {}).get("stage", 0)), ep_size)
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
    if ep_size and config is not None:
        from dive_ds.parallel.ep_model import check_ep_size

        check_ep_size(ep_size, world, config.num_local_experts)
    tokenizer = load_tokenizer(run.data.tokenizer, ref, vocab) if todo else None
    domains, probs = resolve_domains(run.data)
    windows = eval_windows(run, tokenizer, vocab) if todo else {}
    recipe = data_recipe(run.data, domains, probs, tokenizer) if todo else {}
    if rank == 0:
        _record_run(run, ds, ds_source, world, recipe, argv)
        print(
            f"retrain: {world} rank(s) on {accelerator_name()}"
            f"{f', expert parallel {ep_size}' if ep_size else ''}; global batch {run.train.global_batch_size} x "
            f"{run.data.seq_len} tokens; stages {', '.join(p.stage.name for p in plans)}; out {run.out_dir}",
            flush=True,
        )
    _barrier()
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
        from dive_ds.models.shards import is_sharded

        if is_sharded(final):
            print(
                f"retrain: it is sharded by expert (expert parallelism); one HF folder: "
                f"dive-ds consolidate --shards {final} --out HF_DIR",
                flush=True,
            )
    _barrier()
    return results


def retrain(
    config_path: str | None,
    ds_path: str,
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    local_rank: int | None = None,
    argv: list[str] | None = None,
) -> dict:
    """The launcher's entry: read configs, initialise the process group, train, always tear down."""
    from dive_ds.train.config import load_run_config, read_mapping

    run = load_run_config(config_path, overrides)
    ds_raw = read_mapping(ds_path, "DeepSpeed config")
    setup_distributed(local_rank)
    try:
        return train(run, ds_raw, ds_path, stages, argv)
    finally:
        teardown_distributed()
