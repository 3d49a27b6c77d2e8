"""Strict model loading: a folder lacking any weight of its model is refused, never filled at random."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.build.expert_plan import ReconstructConfig
from dive_ds.build.reconstruct import run_reconstruct
from dive_ds.io.loading import check_complete, load_causal_lm
from tests.fixtures.tiny import make_tiny_calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    model_dir, calib_dir = make_tiny_calibration(root)
    moe = run_reconstruct(
        calib_dir, None, root / "moe", ReconstructConfig(num_experts=2, method="random-halves")
    )
    return {"model": model_dir, "moe": moe}


def drop_layer(src: Path, dst: Path, layer: int, keep_index: bool) -> None:
    """Copy a reconstructed MoE without one layer's shard file (its index entries kept, or dropped too)."""
    shutil.copytree(src, dst)
    name = f"model-layer-{layer:05d}.safetensors"
    (dst / name).unlink()
    if not keep_index:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_complete_folders_pass(tiny):
    check_complete(tiny["model"])  # tied lm_head: not expected on disk
    check_complete(tiny["moe"])
    assert type(load_causal_lm(tiny["moe"])).__name__ == "DiveMoeForCausalLM"


def test_missing_shard_dense_tensor_and_index_entry_are_refused(tiny, tmp_path):
    drop_layer(tiny["moe"], tmp_path / "dropped", 1, keep_index=False)
    drop_layer(tiny["moe"], tmp_path / "lost", 1, keep_index=True)
    dense = tmp_path / "dense"
    shutil.copytree(tiny["model"], dense)
    state = load_file(dense / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, dense / "model.safetensors", metadata={"format": "pt"})
    for folder, message in [
        (tmp_path / "dropped", r"lacks 11 weight\(s\) of its model: model.layers.1.input_layernorm.weight, "),
        (
            tmp_path / "lost",
            r"model-layer-00001.safetensors is missing \(named by model.safetensors.index.json\)",
        ),
        (dense, r"lacks 1 weight\(s\) of its model: model.layers.2.mlp.up_proj.weight; "),
    ]:
        for call in (check_complete, load_causal_lm):
            with pytest.raises(ValueError, match=message) as e:
                call(folder)
            assert "\n" not in str(e.value)


def test_strict_load_also_checks_after_loading(tiny, tmp_path, monkeypatch):
    """Even past the header check (e.g. a hub id), transformers' own missing keys are refused."""
    import dive_ds.io.loading as loading

    dropped = tmp_path / "dropped"
    drop_layer(tiny["moe"], dropped, 0, keep_index=False)
    monkeypatch.setattr(loading, "check_complete", lambda folder: None)
    with pytest.raises(ValueError, match=r"lacks 11 weight\(s\) of its model: model.layers.0."):
        loading.load_causal_lm(dropped)
    assert dropped.is_dir()
