"""Reading a sharded MoE folder (the layout of dive_ds/io/shards.py): the whole MoE, one rank's experts,
or all of it streamed layer by layer into one Hugging Face folder (`dive-ds consolidate --shards`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dive_ds.io import atomic
from dive_ds.io.shards import (
    EXPERT_KEYS,
    FORMAT,
    HF_EXPERT,
    MANIFEST,
    expert_file,
    is_sharded,
    load_json,
    node_file,
    read_tensors,
    shared_file,
    shared_layer_file,
)
from dive_ds.models.moe import DiveMoeConfig

# --------------------------------------------------------------------------- reader


class ShardedMoe:
    """A complete sharded MoE folder (checked on open); reads only the files asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = self._read_manifest()
        m = self.manifest
        self.num_layers, self.num_experts, self.nodes = m["num_layers"], m["num_experts"], m["nodes"]
        self._check_complete()
        self._config: DiveMoeConfig | None = None

    def _incomplete(self, what: str) -> ValueError:
        return ValueError(f"{self.folder} is incomplete: {what}")

    def _read_manifest(self) -> dict:
        if not self.folder.is_dir():
            raise ValueError(
                f"{self.folder} does not exist; pass a folder from `dive-ds reconstruct --shards`"
            )
        path = self.folder / MANIFEST
        if not path.is_file():
            if is_sharded(self.folder) or (self.folder / "experts").is_dir():
                raise self._incomplete(
                    f"node 0 has not finished (no {MANIFEST}, no {node_file(0)}); rerun its reconstruct task"
                )
            raise ValueError(
                f"{self.folder} is not a sharded MoE (no {MANIFEST}); pass a folder from `dive-ds reconstruct --shards`"
            )
        m = load_json(path)
        if m is None or m.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a {FORMAT} manifest; rerun `dive-ds reconstruct --shards` into a new folder"
            )
        return m

    def _check_complete(self) -> None:
        missing = [n for n in range(self.nodes) if not (self.folder / node_file(n)).is_file()]
        if missing:
            names = ", ".join(node_file(n) for n in missing)
            if len(missing) == 1:
                raise self._incomplete(
                    f"node {missing[0]} has not finished (no {names}); rerun its reconstruct task"
                )
            ids = ", ".join(map(str, missing))
            raise self._incomplete(
                f"nodes {ids} have not finished (no {names}); rerun their reconstruct tasks"
            )
        for n in range(self.nodes):
            rec = load_json(self.folder / node_file(n))
            if rec is None or rec.get("layout") != self.manifest:
                raise ValueError(
                    f"{self.folder}: {node_file(n)} was written for another plan, layout or config; "
                    "remove the folder and rerun every node's reconstruct task"
                )
        wanted = ["config.json", shared_file()] + [
            shared_layer_file(layer) for layer in range(self.num_layers)
        ]
        for layer in range(self.num_layers):
            wanted += [expert_file(layer, e) for e in range(self.num_experts)]
        for rel in wanted:
            if not (self.folder / rel).is_file():
                raise self._incomplete(
                    f"{rel} is missing; rerun the reconstruct task of the node that writes it"
                )

    @property
    def config(self) -> DiveMoeConfig:
        if self._config is None:
            self._config = DiveMoeConfig.from_pretrained(self.folder)
            c = self._config
            if (c.num_hidden_layers, c.num_local_experts) != (self.num_layers, self.num_experts):
                raise ValueError(
                    f"{self.folder}/config.json has {c.num_hidden_layers} layers x {c.num_local_experts} experts "
                    f"but {MANIFEST} says {self.num_layers} x {self.num_experts}; rerun the reconstruction"
                )
        return self._config

    def shared_global(self) -> dict[str, torch.Tensor]:
        """Tensors outside the decoder layers (embeddings, final norm, lm_head if untied)."""
        return read_tensors(self.folder / shared_file())

    def shared_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Non-expert tensors of one decoder layer, full HF names."""
        self._check_layer(layer)
        return read_tensors(self.folder / shared_layer_file(layer))

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Every non-expert tensor of the model, full HF names."""
        state = self.shared_global()
        for layer in range(self.num_layers):
            state.update(self.shared_layer(layer))
        return state

    def expert_tensors(self, layer: int, experts: list[int]) -> dict[str, torch.Tensor]:
        """{'gate_up_proj' [k,2F,H], 'down_proj' [k,H,F], 'bias' [k,H]} of `experts`, stacked in that order."""
        self._check_layer(layer)
        experts = self._check_experts(experts)
        out: dict[str, torch.Tensor] = {}
        for i, e in enumerate(
            experts
        ):  # one file at a time into the stacked tensors: no second copy of them all
            part = read_tensors(self.folder / expert_file(layer, e))
            if not out:
                keys = [k for k in EXPERT_KEYS if k in part]
                out = {k: torch.empty((len(experts), *part[k].shape), dtype=part[k].dtype) for k in keys}
            if sorted(part) != sorted(out) or any(part[k].shape != out[k].shape[1:] for k in out):
                raise ValueError(
                    f"{self.folder}: expert files of layer {layer} hold different tensors; rerun the writers"
                )
            for k, v in part.items():
                out[k][i].copy_(v)
            del part
        return out

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")

    def _check_experts(self, experts) -> list[int]:
        experts = [int(e) for e in experts]
        if not experts:
            raise ValueError("experts is empty; pass the experts of this rank (experts_of_ep_rank)")
        bad = [e for e in experts if not 0 <= e < self.num_experts]
        if bad or len(set(experts)) != len(experts):
            raise ValueError(f"experts {experts}: pass distinct expert ids in [0, {self.num_experts})")
        return experts


def load_rank_state(folder: str | Path, experts: list[int]) -> dict[str, torch.Tensor]:
    """Every non-expert tensor plus `experts` only (stacked in the given order, [len(experts), ...]), HF names."""
    moe = ShardedMoe(folder)
    state = moe.shared_state()
    for layer in range(moe.num_layers):
        for k, v in moe.expert_tensors(layer, experts).items():
            state[f"model.layers.{layer}.{HF_EXPERT}{k}"] = v
    return state


# --------------------------------------------------------------------------- consolidation


def consolidate_shards(folder: str | Path, out: str | Path) -> Path:
    """Stream a complete sharded folder, layer by layer, into a Hugging Face dive_moe folder at `out` (atomic).

    The files are those of `write_moe`: model-shared.safetensors, model-layer-XXXXX.safetensors,
    model.safetensors.index.json, config.json and the side files (dive_experts.json, tokenizer).
    """
    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the shard folder {folder}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new path or remove it")
    moe = ShardedMoe(folder)
    config = moe.config
    weight_map: dict[str, str] = {}
    with atomic.staged_dir(out) as tmp:
        shared = moe.shared_global()
        name = "model-shared.safetensors"
        atomic.save_tensors(shared, tmp / name)
        weight_map.update(dict.fromkeys(shared, name))
        del shared
        everyone = list(range(moe.num_experts))
        for layer in range(moe.num_layers):
            st = moe.shared_layer(layer)
            # write_moe's order: attention and norms, then experts, then the router
            gate = f"model.layers.{layer}.mlp.gate."
            router = {k: st.pop(k) for k in (gate + "weight", gate + "noise_weight") if k in st}
            router.update({k: st.pop(k) for k in list(st) if k.startswith(gate)})
            tensors = dict(st)
            head = f"model.layers.{layer}.{HF_EXPERT}"
            tensors.update({head + k: v for k, v in moe.expert_tensors(layer, everyone).items()})
            tensors.update(router)
            name = f"model-layer-{layer:05d}.safetensors"
            atomic.save_tensors(tensors, tmp / name)
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors, st, router
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
        config.save_pretrained(tmp)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name not in (MANIFEST, "config.json"):
                shutil.copy2(f, tmp / f.name)
    return out
