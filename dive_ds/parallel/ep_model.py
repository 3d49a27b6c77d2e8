"""Build a DIVE MoE on one rank of an expert-parallel group: shared weights plus this rank's experts only.

The full MoE is never materialised: the model skeleton is made on the meta device, every decoder
layer's `mlp` becomes a `DiveEPMoeBlock` holding E / P experts, and the weights are read straight
from the checkpoint (row slices of the stacked expert tensors of an HF folder, or the per-expert
files of a sharded folder from `dive-ds reconstruct --shards`).

Process groups: DeepSpeed's expert-parallel groups are consecutive global ranks (ep_rank =
rank % P); `ensure_ep_groups` creates them through DeepSpeed's own group registry so the engine
finds and reuses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dive_ds.models.moe import DiveMoeConfig, DiveMoeForCausalLM, align_expert_weights
from dive_ds.parallel.expert_parallel import ep_block_class, ep_group_name, experts_of_ep_rank


def ensure_ep_groups(ep_size: int) -> tuple[int, object]:
    """Create (or find) DeepSpeed's expert-parallel and expert-data-parallel groups -> (ep_rank, ep_group)."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups

    name = ep_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size_=ep_size)
    group = groups._get_expert_parallel_group(name)
    return dist.get_rank(group=group), group


def _hf_weight_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder}: no model.safetensors(.index.json); not a safetensors checkpoint")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def rank_state_hf(folder: Path, experts: list[int]) -> dict[str, torch.Tensor]:
    """Every tensor of an HF dive_moe folder, expert tensors cut to rows `experts` (read as slices)."""
    from safetensors import safe_open

    files = _hf_weight_files(folder)
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    lo, hi = min(experts), max(experts) + 1
    if experts != list(range(lo, hi)):
        raise ValueError(f"experts {experts}: an expert-parallel rank holds a contiguous block")
    out = {}
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                if ".mlp.experts." in key:
                    out[key] = f.get_slice(key)[lo:hi].clone()
                else:
                    out[key] = f.get_tensor(key).clone()
    return out


def rank_state(folder: Path, experts: list[int]) -> dict[str, torch.Tensor]:
    """This rank's tensors from an HF folder or a sharded folder (`dive-ds reconstruct --shards`)."""
    try:
        from dive_ds.io.shard_reader import load_rank_state
        from dive_ds.io.shards import is_sharded
    except ImportError:  # pragma: no cover - the shard module is part of the package
        is_sharded = None
    if is_sharded is not None and is_sharded(folder):
        return load_rank_state(folder, experts)
    return rank_state_hf(folder, experts)


def build_ep_model(folder: str | Path, ep_size: int, ep_rank: int) -> DiveMoeForCausalLM:
    """The MoE of `folder` with this rank's experts only (fp32, real weights, strict load)."""
    from transformers.initialization import no_init_weights
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    folder = Path(folder)
    config = DiveMoeConfig.from_pretrained(folder)
    experts = experts_of_ep_rank(config.num_local_experts, ep_size, ep_rank)
    with no_init_weights(), torch.device("meta"):
        model = DiveMoeForCausalLM(config)
    block_cls = ep_block_class()
    for layer in model.model.layers:
        layer.mlp = block_cls(config, ep_size, ep_rank)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffers: recompute
    state = rank_state(folder, experts)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not fit its config: missing {sorted(set(missing) - tied)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    if tied:
        model.tie_weights()
    align_expert_weights(model)
    for layer in model.model.layers:  # to_empty made new tensors: tag them again
        from dive_ds.parallel.expert_parallel import tag_parameters

        tag_parameters(layer.mlp)
    return model.eval()
