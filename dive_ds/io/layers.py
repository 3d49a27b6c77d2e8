"""A model folder read one decoder layer at a time: dense (any supported family) or dive_moe, a Hugging
Face folder or the sharded layout of `reconstruct --shards`. Only the tensors asked for are read.

The streaming passes (calibration, router fit, streamed evaluation and mining) build one decoder layer
from here, run it on their carried hidden states and drop it before the next."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dive_ds.io.loading import LayerwiseCheckpoint


def decoder_classes(config):
    """(DecoderLayer class, RotaryEmbedding class) of a transformers causal-LM architecture."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__]
    layer_cls = next(getattr(module, n) for n in dir(module) if n.endswith("DecoderLayer"))
    rope_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    return layer_cls, rope_cls


def build_layer(
    config, layer_cls, idx: int, state: dict[str, torch.Tensor], dtype=torch.float32, device=None
):
    """A decoder layer of `layer_cls` holding `state` (layer-relative names), in `dtype` on `device`."""
    with torch.device("meta"):
        layer = layer_cls(config, idx)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval()


class MoeLayers:
    """The tensors of a dive_moe folder, HF or sharded, one decoder layer at a time."""

    def __init__(self, folder: str | Path):
        from dive_ds.io.shard_reader import ShardedMoe
        from dive_ds.io.shards import is_sharded
        from dive_ds.models.moe import DiveMoeConfig

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"{self.folder} is not a model folder (no config.json); pass a dive_moe folder")
        self.sharded = is_sharded(self.folder)
        if self.sharded:
            self.shards = ShardedMoe(self.folder)
            self.config = self.shards.config
        else:
            self.config = DiveMoeConfig.from_pretrained(self.folder)
            self.ckpt = LayerwiseCheckpoint(self.folder)
        if getattr(self.config, "model_type", None) != "dive_moe":
            raise ValueError(f"{self.folder} is not a dive_moe model; run `dive-ds reconstruct` first")

    def get(self, key: str) -> torch.Tensor:
        """One tensor outside the decoder layers, read alone (nothing else of the file stays in memory)."""
        if self.sharded:
            from safetensors import safe_open

            from dive_ds.io.shards import shared_file

            with safe_open(self.folder / shared_file(), "pt") as f:  # one open: the key checked, then read
                if key not in f.keys():
                    raise ValueError(
                        f"{self.folder} has no tensor {key}: the folder is incomplete or of another model"
                    )
                return f.get_tensor(key).clone()
        return self.ckpt.get(key)

    def has(self, key: str) -> bool:
        if self.sharded:
            from safetensors import safe_open

            from dive_ds.io.shards import shared_file

            with safe_open(self.folder / shared_file(), "pt") as f:
                return key in f.keys()
        return self.ckpt.has(key)

    def layer_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer-relative names (`self_attn.q_proj.weight`, `mlp.experts.gate_up_proj`, ...)."""
        head = f"model.layers.{layer}."
        if not self.sharded:
            return self.ckpt.layer_state(layer)
        st = {k[len(head) :]: v for k, v in self.shards.shared_layer(layer).items()}
        ex = self.shards.expert_tensors(layer, list(range(self.config.num_local_experts)))
        st.update({f"mlp.experts.{k}": v for k, v in ex.items()})
        return st


def build_moe_layer(config, layer: int, state: dict[str, torch.Tensor]):
    """The MoE decoder layer on the host in float32 (sliced_channels compares its bytes); moved by the caller."""
    from dive_ds.models.moe import DiveMoeDecoderLayer

    with torch.device("meta"):
        module = DiveMoeDecoderLayer(config, layer)
    module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, assign=True, strict=True)
    return module.eval()


class ModelLayers:
    """Any model folder the project reads (dense HF, dive_moe HF or sharded), layer by layer: the config,
    the tensors outside the layers (`get`, `has`) and `layer(i, dtype, device)`, a built decoder layer."""

    def __init__(self, folder: str | Path):
        from dive_ds.io.shards import is_sharded

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ValueError(
                f"{self.folder} is not a model folder (no config.json); pass a Hugging Face or dive_moe folder"
            )
        self.moe: MoeLayers | None = None
        sharded = is_sharded(self.folder)
        if not sharded:  # every weight present, of its shape, before any layer is read (a sharded folder
            from dive_ds.io.loading import check_complete  # is checked by its reader)

            check_complete(self.folder)
        model_type = _model_type(self.folder)
        if model_type == "dive_moe" or sharded:
            self.moe = MoeLayers(self.folder)
            self.config = self.moe.config
            self._layer_cls = None
        else:
            from transformers import AutoConfig

            from dive_ds.io.loading import check_gated_mlp

            self.config = AutoConfig.from_pretrained(self.folder)
            check_gated_mlp(self.config)
            self.ckpt = LayerwiseCheckpoint(self.folder)
            self._layer_cls, _ = decoder_classes(self.config)
        self.config._attn_implementation = (
            "sdpa"  # is_causal with no mask, as the whole model without padding
        )

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def get(self, key: str) -> torch.Tensor:
        return self.moe.get(key) if self.moe is not None else self.ckpt.get(key)

    def has(self, key: str) -> bool:
        return self.moe.has(key) if self.moe is not None else self.ckpt.has(key)

    def output_weight(self) -> torch.Tensor:
        """lm_head's weight (the embedding when the two are tied)."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        return self.get(
            "model.embed_tokens.weight" if tied or not self.has("lm_head.weight") else "lm_head.weight"
        )

    def layer(self, idx: int, dtype: torch.dtype = torch.float32, device=None):
        if self.moe is not None:
            from dive_ds.models.moe import DiveMoeDecoderLayer

            return build_layer(
                self.config, DiveMoeDecoderLayer, idx, self.moe.layer_state(idx), dtype, device
            )
        return build_layer(self.config, self._layer_cls, idx, self.ckpt.layer_state(idx), dtype, device)

    def rotary(self, device):
        """The model's rotary embedding module on `device`."""
        if self.moe is not None:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            return LlamaRotaryEmbedding(config=self.config).to(device)
        return decoder_classes(self.config)[1](config=self.config).to(device)


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
