"""Export a dive_moe checkpoint in a format that loads without dive_ds.

- "mixtral": a stock transformers Mixtral checkpoint. A DIVE MoE without expert output biases is
  exactly a Mixtral model: same decoder, same fused expert layout, and sparse top-k routing with
  softmax over the chosen logits equals Mixtral's softmax-then-renormalise. The noisy top-k
  `noise_weight` is training-only and is dropped. Loads anywhere Mixtral does.
- "portable": the dive_moe checkpoint itself (weights hard-linked) plus its modeling file, generated
  from the package's model code (dive_ds.models.portable), and `auto_map` in config.json; loads with
  `trust_remote_code=True`. Any DIVE MoE: biases, Qwen attention, every router gate.
"""

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from dive_ds.io.atomic import link_or_copy, staged_dir
from dive_ds.io.loading import check_complete, load_causal_lm
from dive_ds.io.shards import is_sharded
from dive_ds.models.moe import DiveMoeConfig, DiveMoeForCausalLM
from dive_ds.models.portable import AUTO_MAP, MODELING_FILE, modeling_source

logger = logging.getLogger(__name__)

# Files of a model folder that are not weights or config: copied along so the export is usable as is.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
FORMATS = ("mixtral", "portable")


def mixtral_config(config: DiveMoeConfig) -> MixtralConfig:
    """The MixtralConfig with the same decoder as a DiveMoeConfig (raises ValueError when none exists)."""
    if config.dense_model_type not in ("llama", "mistral"):
        raise ValueError(
            f"dense_model_type={config.dense_model_type!r}: the MoE keeps {config.dense_model_type}'s attention "
            "(Qwen2: q/k/v biases; Qwen3: q/k norms), which Mixtral's has no place for. Keep the dive_moe format for it."
        )
    if config.attention_bias:
        raise ValueError(
            "attention_bias=True: Mixtral attention has no biases, so this model has no Mixtral equivalent. "
            "Keep the dive_moe format for it."
        )
    if config.expert_intermediate_sizes is not None:
        raise ValueError(
            "expert_intermediate_sizes: this MoE's layers have different expert widths, Mixtral's one "
            "intermediate_size for all. Keep the dive_moe format for it (or --format portable)."
        )
    if config.shared_expert_intermediate_size:
        raise ValueError(
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: Mixtral has no shared "
            "expert, so the export would drop it. Keep the dive_moe format for it (or --format portable)."
        )
    if config.router_gate == "switch":
        raise ValueError(
            "router_gate='switch' scales each expert's output by its unnormalised probability; Mixtral "
            "renormalises over the top-k, so the export would change the model. Keep the dive_moe format for it."
        )
    return MixtralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.expert_intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        sliding_window=None,
        attention_dropout=config.attention_dropout,
        num_experts_per_tok=config.num_experts_per_tok,
        num_local_experts=config.num_local_experts,
        router_jitter_noise=0.0,
        rope_parameters=dict(config.rope_parameters) if config.rope_parameters is not None else None,
        dtype=config.dtype,
    )


def _check_no_bias(model: DiveMoeForCausalLM) -> None:
    for i, layer in enumerate(model.model.layers):
        bias = layer.mlp.experts.bias
        if bias is not None and bool(bias.detach().ne(0).any()):
            raise ValueError(
                f"layer {i} has non-zero expert output biases (max |b| = {bias.detach().abs().max().item():.3g}); "
                "Mixtral experts have no bias, so the export would change the model. Keep the dive_moe format "
                "(loadable with AutoModelForCausalLM after `import dive_ds`), or build/retrain the MoE with "
                "expert_bias=False."
            )


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"{folder} has no readable config.json; pass a dive_moe model folder") from None


def export_mixtral(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the dive_moe checkpoint in `src_dir` as a MixtralForCausalLM checkpoint in `out_dir`.

    Refuses (ValueError) when any expert bias is non-zero or `out_dir` is a non-empty folder.
    The checkpoint is written to a temporary sibling folder and renamed at the end, so a
    failed export leaves nothing behind.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _check_export_paths(src_dir, out_dir)
    config = DiveMoeConfig.from_pretrained(src_dir)
    target_config = mixtral_config(config)
    # strict: a weight missing from the checkpoint is refused, never initialised at random
    model = load_causal_lm(src_dir, DiveMoeForCausalLM, config=config, dtype="auto")
    _check_no_bias(model)
    if config.router_mode == "dense":
        logger.warning(
            "router_mode='dense' in %s: Mixtral always routes sparse top-%d.",
            src_dir,
            config.num_experts_per_tok,
        )

    state = {
        key: tensor
        for key, tensor in model.state_dict().items()
        if not key.endswith(("mlp.gate.noise_weight", "mlp.experts.bias"))
    }
    # Built on the meta device and filled with assign=True: the export shares the source's storage.
    with torch.device("meta"):
        target = MixtralForCausalLM(target_config)
    target.load_state_dict(state, strict=True, assign=True)
    target.tie_weights()
    target.eval()

    with _new_folder(out_dir) as tmp_dir:
        target.save_pretrained(tmp_dir)
        for name in _SIDE_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp_dir / name)
    logger.info("exported %s -> %s (MixtralForCausalLM)", src_dir, out_dir)
    return out_dir


def export_portable(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the dive_moe checkpoint in `src_dir` to `out_dir` with its own modeling file and `auto_map`,
    so that `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` needs no dive_ds.

    The weights are unchanged: their files are hard-linked (copied across file systems). Copied along:
    generation_config.json and the tokenizer files; dive_ds's own records (dive_experts.json, ...) are
    not. Refuses (ValueError) a folder that is not a complete Hugging Face dive_moe checkpoint, and an
    `out_dir` that is not new or empty. Written to a temporary sibling folder and renamed at the end.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _check_export_paths(src_dir, out_dir)
    source = modeling_source()  # refuses a model module that stopped being self-contained
    config = json.loads((src_dir / "config.json").read_text())
    config["auto_map"] = dict(AUTO_MAP)
    index = src_dir / "model.safetensors.index.json"
    if index.is_file():  # valid and complete: checked above
        weights = [index.name, *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        weights = ["model.safetensors"]
    with _new_folder(out_dir) as tmp_dir:
        for name in weights:
            link_or_copy(src_dir / name, tmp_dir / name)
        for name in ("generation_config.json", *_SIDE_FILES):
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp_dir / name)
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp_dir / MODELING_FILE).write_text(source)
    logger.info("exported %s -> %s (dive_moe with %s, auto_map)", src_dir, out_dir, MODELING_FILE)
    return out_dir


def export_model(src_dir: str | Path, out_dir: str | Path, fmt: str) -> Path:
    """`dive-ds export`: write `src_dir` in format `fmt` (one of FORMATS) to `out_dir`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    return (export_mixtral if fmt == "mixtral" else export_portable)(src_dir, out_dir)


def _check_export_paths(src_dir: Path, out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"out_dir={out_dir} exists and is not an empty folder: choose a new path or remove it."
        )
    if is_sharded(src_dir):
        raise ValueError(
            f"{src_dir} is a sharded dive_moe folder; join it first with `dive-ds consolidate --shards "
            f"{src_dir} --out HF_DIR` and export HF_DIR"
        )
    model_type = _model_type(src_dir)
    if model_type != "dive_moe":
        raise ValueError(
            f"{src_dir} is a {model_type!r} model, not dive_moe: it has no experts to export; pass the "
            "--out of `dive-ds reconstruct` or of retraining"
        )
    # from the files' headers: a lost shard or a tensor of the wrong shape is refused before anything is
    # written (an export that cannot load is never made)
    check_complete(src_dir)


@contextlib.contextmanager
def _new_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder to write into, renamed to `out_dir` (new or empty) when the block ends
    without error, removed otherwise."""
    with staged_dir(out_dir) as tmp_dir:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from other users
        yield tmp_dir
