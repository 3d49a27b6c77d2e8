"""A stage's outputs: the full weights gathered from the live engine (LoRA merged) as a plain HF folder, or
as a sharded folder written by every expert-parallel rank; and the offline consolidation of a checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dive_ds.build.moe_writer import SIDE_FILES
from dive_ds.build.outputs import check_not_input, claim_output, read_identity
from dive_ds.io import atomic
from dive_ds.io.atomic import write_json
from dive_ds.models.lora import (
    add_expert_lora,
    lora_settings_from_state_dict,
    merge_expert_lora,
    merge_lora_tensors,
)
from dive_ds.models.moe import DiveMoeConfig, DiveMoeForCausalLM
from dive_ds.parallel.distributed import barrier
from dive_ds.train.checkpoint import (
    EP_TRAINABLE,
    SHARED_TRAINABLE,
    STAGE_META,
    TAG_RE,
    is_complete,
    latest_tag,
)
from dive_ds.train.config import RunConfig
from dive_ds.train.planning import DONE_FILE, StagePlan

TOKENIZER_FILES = (*SIDE_FILES, "dive_experts.json")
"""Files besides weights and config that a stage output carries over from its input."""


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
            merge_lora_tensors(tensors, float(lora["alpha"]) / int(lora["r"]))
        ids = m.experts.expert_ids
        out[layer] = {e: {k: v[i].contiguous() for k, v in tensors.items()} for i, e in enumerate(ids)}
    return out


def merge_shared_lora(state: dict[str, torch.Tensor], lora: dict | None) -> dict[str, torch.Tensor]:
    """Fold the shared experts' LoRA (replicated like attention, so in the gathered shared state) into their
    weights, in place: a sharded export's shared files hold plain weights, as its expert files do."""
    if lora is None:
        return state
    scale = float(lora["alpha"]) / int(lora["r"])
    for head in [
        k.removesuffix("lora_gate_up_A") for k in state if k.endswith(".shared_expert.lora_gate_up_A")
    ]:
        merge_lora_tensors(state, scale, head)
    return state


def export_sharded(
    shared: dict[str, torch.Tensor] | None,
    experts: dict[int, dict[int, dict[str, torch.Tensor]]],
    config_dir: Path,
    out: Path,
    ep_size: int,
    info: dict,
    router_gate: str | None = None,
) -> Path:
    """An expert-parallel stage's output as a sharded MoE folder (dive_ds.io.shards), written by
    every rank at once: rank 0 the shared tensors (`shared`, from gather_state_dict(skip_ep_experts=True)),
    config and tokenizer; each expert by the first rank that holds it. No rank ever holds every
    expert. DONE_FILE is written last, once every rank's marker is there. Collective."""
    from dive_ds.io.shard_reader import ShardedMoe
    from dive_ds.io.shards import ShardWriter

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = DiveMoeConfig.from_pretrained(config_dir)
    if router_gate is not None:  # the gate the stage trained with, not the input's
        config.router_gate = router_gate
    if rank == 0 and out.exists():  # an unfinished earlier export of this stage: moved aside, not deleted
        print(f"an unfinished earlier export was moved to {atomic.move_aside(out)}", flush=True)
    barrier()
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
    barrier()
    if rank == 0:
        ShardedMoe(out)  # every node marker and file is there
        atomic.write_json(out / DONE_FILE, info)
    barrier()
    return out


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config_dir: Path,
    out: Path,
    lora: dict | None,
    info: dict,
    files_from: Path | None = None,
    router_gate: str | None = None,
) -> Path:
    """Plain DIVE MoE checkpoint (LoRA merged, sparse routing config) from a full state dict; atomic.
    `router_gate`: the gate the stage trained with (None: the one `config_dir` names)."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(config_dir)
    if not isinstance(config, DiveMoeConfig):
        raise ValueError(f"{config_dir} does not hold a dive_moe config")
    if router_gate is not None:
        config.router_gate = router_gate
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
    with atomic.staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        source = files_from or config_dir
        for fname in TOKENIZER_FILES:
            if (source / fname).exists() and not (tmp / fname).exists():
                shutil.copy2(source / fname, tmp / fname)
        (tmp / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
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


CONSOLIDATION_COPIES = 2  # fp32 copies of the whole model at the peak: merged state dict, model


def check_consolidation_memory(tag_dir: Path, source: Path | None, avail: int | None = None) -> None:
    """--consolidate builds the whole fp32 model in one process: refuse up front, in one line, when that
    cannot fit this node's available memory, naming what it needs and the streamed alternative."""
    from dive_ds.models.moe import DiveMoeConfig, count_parameters
    from dive_ds.parallel.ranks import host_memory_per_rank

    config = next((d / "config.json" for d in (tag_dir, source) if d and (d / "config.json").is_file()), None)
    avail = host_memory_per_rank() if avail is None else avail
    if config is None or avail is None:
        return
    raw = json.loads(config.read_text())
    if raw.get("model_type") != DiveMoeConfig.model_type:
        return
    need = CONSOLIDATION_COPIES * 4 * count_parameters(DiveMoeConfig(**raw))["total"]
    if need > avail:
        stage = tag_dir.parent.parent
        raise ValueError(
            f"--consolidate {tag_dir} builds the whole model in fp32 in this process: ~{need / 2**30:.1f} GiB, "
            f"but ~{avail / 2**30:.1f} GiB are available here; run it on a node with more memory, or use the "
            f"stage's own output {stage / 'model'} (with expert parallelism a sharded folder, which "
            "`dive-ds consolidate --shards` joins layer by layer)"
        )


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
    source = _stage_input(ckpt_dir / tag, meta)  # before the heavy read: another model there is refused
    check_consolidation_memory(ckpt_dir / tag, source)
    if meta.get("ep_size"):
        state = _ep_checkpoint_state(ckpt_dir / tag, meta)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    if meta.get("exclude_frozen") or meta.get("ep_size"):  # frozen weights: read from the stage input
        if source is None:
            raise ValueError(
                f"{ckpt_dir / tag} was saved without frozen weights, which come from the stage input "
                f"{meta.get('input')}; that folder is gone: restore it to consolidate"
            )
        from dive_ds.io.shard_reader import ShardedMoe
        from dive_ds.io.shards import is_sharded

        if is_sharded(source):
            sharded = ShardedMoe(source)
            full = sharded.shared_state()
            experts = list(range(sharded.config.num_local_experts))
            for layer in range(sharded.config.num_hidden_layers):
                for key, value in sharded.expert_tensors(layer, experts).items():
                    full[f"model.layers.{layer}.mlp.experts.{key}"] = value
            state = {k: v.float() for k, v in full.items()} | state
        else:
            from dive_ds.io.loading import LayerwiseCheckpoint

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
        files_from=source,
    )


def _stage_input(tag_dir: Path, meta: dict) -> Path | None:
    """The stage input a checkpoint's commit record names (None: gone). Recorded with a fingerprint
    (absolute path): another model at that path is refused. An older record (a path as given, maybe
    relative to the launch's directory, no fingerprint): its config.json must equal the checkpoint's."""
    from dive_ds.io.fingerprint import check_input

    path = Path(meta.get("input") or "")
    if not meta.get("input") or not (path / "config.json").is_file():
        return None
    if meta.get("input_fingerprint"):
        return check_input(
            {"path": str(path), "fingerprint": meta["input_fingerprint"]}, f"{tag_dir}: stage input"
        )
    if (tag_dir / "config.json").is_file() and json.loads(
        (tag_dir / "config.json").read_text()
    ) != json.loads((path / "config.json").read_text()):
        raise ValueError(
            f"{tag_dir} names its stage input as {meta['input']!r}, but {path.resolve()} holds another model "
            "(config.json differs); run from the directory the training was launched in"
        )
    return path


def write_stage_output(
    run: RunConfig, plan: StagePlan, input_dir: Path, state, local_experts, result: dict, meta: dict,
    rank: int, world: int, zero_stage: int, ep_size: int | None,
) -> None:  # fmt: skip
    """The stage's model folder (HF on rank 0, or sharded by every rank) and its summary.json."""
    stage = plan.stage
    if rank == 0 or ep_size:
        info = {
            "stage": stage.name,
            "input": str(Path(input_dir).resolve()),
            "steps": plan.steps,
            "world_size": world,
            "zero_stage": zero_stage,
            "final_eval": result["final_eval"],
            "lora_merged": stage.lora,
            "run_config": run.to_dict(),
        }
        if ep_size:  # every rank writes its experts: no rank gathers the whole MoE
            if state is not None:
                merge_shared_lora(state, meta["lora"])
            export_sharded(state, local_experts, input_dir, plan.model_dir, ep_size, info | {"sharded": True},
                           router_gate=stage.router_gate)  # fmt: skip
        else:
            export_hf(state, input_dir, plan.model_dir, meta["lora"], info, router_gate=stage.router_gate)
    if rank == 0:
        write_json(plan.dir / "summary.json", result)
        final = result["final_eval"]
        scored = f"held-out loss {final['loss']:.4f}, mean ppl {final['ppl_mean']:.2f}; " if final else ""
        print(f"[{stage.name}] done: {scored}model -> {plan.model_dir}", flush=True)
