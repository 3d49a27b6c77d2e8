"""A DIVE MoE stored as per-expert files, written by several nodes at once ("reconstruction once per node").

On a cluster every node runs one reconstruct task; each writes only experts that its own
ranks hold under expert parallelism, so no node ever materialises the whole MoE. Layout of
a sharded folder OUT:

    OUT/dive_shards.json                               layout + fingerprint (node 0)
    OUT/config.json, dive_experts.json, tokenizer      node 0
    OUT/shared/model-shared.safetensors                embeddings, final norm, lm_head if untied (node 0)
    OUT/shared/layer-{l:05d}.safetensors               every non-expert tensor of layer l, full HF names (node 0)
    OUT/experts/layer-{l:05d}/expert-{e:03d}.safetensors   gate_up_proj [2F,H], down_proj [H,F], bias [H]
    OUT/nodes/node-{n:05d}.json                        what node n wrote; written last (its completion marker)

Every file appears under its final name only when complete (temp name + os.replace in the same
folder); the folder itself is never renamed, since several nodes write into it concurrently.

Placement (which node holds and writes each expert) follows DeepSpeed: see dive_ds.io.placement.

Legend: E experts, P expert-parallel size, L layers, F expert FFN width, H hidden, k experts asked for.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from dive_ds.io import atomic
from dive_ds.io.placement import check_node, check_placement, experts_written_by, writers
from dive_ds.models.moe import DiveMoeConfig

FORMAT = "dive_ds.shards/1"
MANIFEST = "dive_shards.json"
EXPERT_KEYS = ("gate_up_proj", "down_proj", "bias")
"""Keys of one expert file (bias is absent for a model without expert output biases)."""
HF_EXPERT = "mlp.experts."


# --------------------------------------------------------------------------- file names and small I/O


def shared_file() -> str:
    return "shared/model-shared.safetensors"


def shared_layer_file(layer: int) -> str:
    return f"shared/layer-{layer:05d}.safetensors"


def expert_file(layer: int, expert: int) -> str:
    return f"experts/layer-{layer:05d}/expert-{expert:03d}.safetensors"


def node_file(node: int) -> str:
    return f"nodes/node-{node:05d}.json"


def read_tensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file in private memory (the mapping is closed again, as in loading.py)."""
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).clone() for k in (f.keys() if keys is None else keys)}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def config_fingerprint(config: DiveMoeConfig) -> str:
    """Short hash of a MoE config (the default fingerprint of a ShardWriter)."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def layout_manifest(
    num_layers: int, num_experts: int, ep_size: int, nodes: int, gpus_per_node: int, fingerprint: str
) -> dict:
    """The content of dive_shards.json (JSON keys are strings: writers maps str(expert) -> node)."""
    return {
        "format": FORMAT,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "ep_size": ep_size,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "writers": {str(e): n for e, n in writers(num_experts, ep_size, nodes, gpus_per_node).items()},
        "fingerprint": fingerprint,
    }


def _first_difference(old: dict, new: dict) -> str:
    for key in new:
        if old.get(key) != new[key]:
            if key == "writers":
                return "expert writers differ"
            return f"{key} {old.get(key)!r} != {new[key]!r}"
    return "contents differ"


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_sharded(folder: str | Path) -> bool:
    """Whether `folder` is (or is becoming) a sharded MoE folder rather than a Hugging Face one."""
    folder = Path(folder)
    return (folder / MANIFEST).is_file() or (folder / "nodes").is_dir()


def check_shard_out(out: Path) -> None:
    """ValueError when `out` exists and is not (the start of) a sharded folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder for the shards")
    # hidden names are other writers' temp files (a concurrent node 0 creating dive_shards.json)
    visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if visible and not (is_sharded(out) or (out / "experts").is_dir()):
        raise ValueError(
            f"--out {out} already holds something else (no {MANIFEST}); use another --out or remove it"
        )


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Writes one node's part of a sharded MoE folder; `finish()` writes the node's completion marker last.

    Node 0 writes the shared tensors (`write_shared`, `write_shared_layer` for every layer), config.json
    and dive_shards.json; every node writes the experts it is the writer of (`self.experts`) for
    every layer. Refuses (ValueError) a folder that holds another layout or fingerprint.

    `fingerprint` names the content (the reconstruction plan; a stage and step when saving a retrained
    model): every node of one save passes the same, and a folder never mixes two. Default: a hash of
    the config. A rerun of a node rewrites its files; its old marker is removed before the first one.
    """

    def __init__(
        self,
        out: str | Path,
        config: DiveMoeConfig,
        num_experts: int,
        ep_size: int,
        nodes: int,
        gpus_per_node: int,
        node: int,
        fingerprint: str | None = None,
    ):
        check_placement(num_experts, ep_size, nodes, gpus_per_node)
        check_node(node, nodes)
        if config.num_local_experts != num_experts:
            raise ValueError(
                f"num_experts={num_experts} but the config has num_local_experts={config.num_local_experts}; "
                "pass the config of this MoE"
            )
        self.out = Path(out)
        self.config = config
        self.node = node
        self.num_layers = config.num_hidden_layers
        self.num_experts = num_experts
        self.experts = experts_written_by(node, num_experts, ep_size, nodes, gpus_per_node)
        """The experts this node writes (sorted)."""
        self.fingerprint = fingerprint or config_fingerprint(config)
        self.manifest = layout_manifest(
            self.num_layers, num_experts, ep_size, nodes, gpus_per_node, self.fingerprint
        )
        self.files: list[str] = []
        self.tensor_bytes = 0
        self._started = False
        self.t0 = time.time()
        check_shard_out(self.out)
        self._check_existing()
        self.out.mkdir(parents=True, exist_ok=True)
        if node == 0 and load_json(self.out / MANIFEST) != self.manifest:
            atomic.write_text(self.out / MANIFEST, json.dumps(self.manifest, indent=1) + "\n")

    def _check_existing(self) -> None:
        """Another plan, layout or config already in OUT (its manifest or any node marker) -> ValueError."""
        old = load_json(self.out / MANIFEST)
        if old is not None and old != self.manifest:
            raise ValueError(
                f"{self.out} holds another sharded MoE ({_first_difference(old, self.manifest)}); "
                "use another --out or remove it"
            )
        marker_dir = self.out / "nodes"
        for path in sorted(marker_dir.glob("node-*.json")) if marker_dir.is_dir() else []:
            rec = load_json(path)
            if rec is None or rec.get("layout") != self.manifest:
                raise ValueError(
                    f"{self.out} holds another sharded MoE (nodes/{path.name} was written for another "
                    "plan, layout or config); use another --out or remove it"
                )

    def already_done(self) -> bool:
        """This node's marker is there, for this layout and fingerprint, and every file it lists exists."""
        rec = load_json(self.out / node_file(self.node))
        return (
            rec is not None
            and rec.get("layout") == self.manifest
            and all((self.out / f).is_file() for f in rec.get("files", []))
        )

    def _begin(self) -> None:
        # A marker from an earlier run goes before the first file is rewritten: the folder must not
        # look complete while it holds a mix of the two runs.
        if not self._started:
            (self.out / node_file(self.node)).unlink(missing_ok=True)
            self._started = True

    def _save(self, tensors: dict[str, torch.Tensor], rel: str) -> None:
        self._begin()
        atomic.save_tensors(tensors, self.out / rel)
        self.files.append(rel)
        self.tensor_bytes += _nbytes(tensors)

    def _node0(self, what: str) -> None:
        if self.node != 0:
            raise ValueError(f"only node 0 writes {what} (this is node {self.node}); skip it on other nodes")

    def write_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors outside the decoder layers (embeddings, final norm, lm_head if untied), HF names."""
        self._node0("the shared tensors")
        bad = [k for k in tensors if k.startswith("model.layers.")]
        if bad:
            raise ValueError(f"write_shared got the layer tensor {bad[0]}; pass it to write_shared_layer")
        self._save(tensors, shared_file())

    def write_shared_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        """Every non-expert tensor of decoder layer `layer` (attention, norms, router), full HF names."""
        self._node0("the shared layer tensors")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        head = f"model.layers.{layer}."
        bad = [k for k in tensors if not k.startswith(head) or HF_EXPERT in k]
        if bad:
            raise ValueError(
                f"write_shared_layer({layer}) got {bad[0]}; pass only non-expert tensors named {head}*"
            )
        self._save(tensors, shared_layer_file(layer))

    def write_expert(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """One expert of one layer: gate_up_proj [2F,H], down_proj [H,F] and (optional) bias [H]."""
        if expert not in self.experts:
            raise ValueError(
                f"node {self.node} does not write expert {expert} (it writes {self.experts}); "
                "write each expert on its shard_writer node"
            )
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        if set(tensors) - set(EXPERT_KEYS) or not {"gate_up_proj", "down_proj"} <= set(tensors):
            raise ValueError(f"expert tensors are {sorted(tensors)}; pass gate_up_proj, down_proj and bias")
        self._save(tensors, expert_file(layer, expert))

    def copy_file(self, src: str | Path, name: str | None = None) -> None:
        """Copy a side file (tokenizer, generation config) into OUT under `name` (default: its own name)."""
        src = Path(src)
        rel = name or src.name
        self._begin()
        atomic.copy_file(src, self.out / rel)
        self.files.append(rel)

    def finish(self, extra_files: dict[str, str] | None = None) -> dict:
        """Write config.json (node 0), `extra_files` ({name in OUT: text}), then this node's marker -> its record."""
        expected = [expert_file(layer, e) for layer in range(self.num_layers) for e in self.experts]
        if self.node == 0:
            expected += [shared_file()] + [shared_layer_file(layer) for layer in range(self.num_layers)]
        self._begin()
        missing = [f for f in expected if f not in self.files]
        if missing:
            raise ValueError(
                f"node {self.node} has not written {missing[0]} ({len(missing)} file(s) missing); "
                "write every file of this node before finish()"
            )
        if self.node == 0:
            atomic.write_text(self.out / "config.json", self.config.to_json_string(use_diff=True))
            self.files.append("config.json")
        for name, text in (extra_files or {}).items():
            atomic.write_text(self.out / name, text)
            self.files.append(name)
        record = {
            "node": self.node,
            "layout": self.manifest,
            "files": self.files,
            "experts": self.experts,
            "seconds": round(time.time() - self.t0, 3),
            "tensor_bytes": self.tensor_bytes,
        }
        atomic.write_text(self.out / node_file(self.node), json.dumps(record, indent=1) + "\n")
        return record
