"""Registry evaluation windows are drawn and tokenized once per process for the same registry, tokenizer and
settings (the demo scores seven models of one tokenizer on the same windows)."""

import json
import shutil

import torch

import dive_ds.build.evaluate as ev
from tests.fixtures.tiny import bpe_tokenizer
from tests.fixtures.train_setup import write_tiny_registry


def test_windows_are_drawn_once_for_the_same_registry_tokenizer_and_settings(tmp_path, monkeypatch):
    draws = []
    real = ev._draw_eval_windows
    monkeypatch.setattr(ev, "_draw_eval_windows", lambda *a: draws.append(a[1:]) or real(*a))
    reg = write_tiny_registry(tmp_path)
    a, b = tmp_path / "model_a", tmp_path / "model_b"
    bpe_tokenizer(a)
    shutil.copytree(a, b)  # another model folder with the same tokenizer files
    (b / "model.safetensors").write_bytes(b"weights are not the tokenizer's")
    first = ev.registry_eval_windows(reg, a, 2, 8, 42)
    assert sorted(first) == ["code", "prose"] and first["code"].shape == (2, 8) and len(draws) == 1
    first["code"].zero_()  # a caller writing into its windows does not touch the kept ones
    again = ev.registry_eval_windows(reg, b, 2, 8, 42)
    assert len(draws) == 1 and not torch.equal(again["code"], first["code"])  # not drawn again
    assert torch.equal(again["prose"], first["prose"])
    ev.registry_eval_windows(reg, a, 2, 8, 7)  # another split seed: drawn for it
    assert registry_eval_windows_shape(reg, a) == (3, 8) and len(draws) == 3  # other settings likewise
    c = tmp_path / "model_c"
    bpe_tokenizer(c)
    conf = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps(conf | {"model_max_length": 77}))
    ev.registry_eval_windows(reg, c, 2, 8, 42)  # another tokenizer: drawn for it
    assert len(draws) == 4


def registry_eval_windows_shape(reg, model):
    return tuple(ev.registry_eval_windows(reg, model, 3, 8, 42)["code"].shape)


def test_a_hub_model_id_draws_its_windows_without_a_local_folder(tmp_path, monkeypatch):
    """A model given by hub id has no folder to digest: its windows are drawn as before (uncached)."""
    seen = []
    monkeypatch.setattr(
        ev, "_draw_eval_windows", lambda reg, model, *a: seen.append(model) or {"x": torch.ones(1)}
    )
    reg = write_tiny_registry(tmp_path)
    assert ev.registry_eval_windows(reg, "HuggingFaceTB/SmolLM2-135M", 2, 8, 42)["x"].tolist() == [1.0]
    ev.registry_eval_windows(reg, "HuggingFaceTB/SmolLM2-135M", 2, 8, 42)
    assert seen == ["HuggingFaceTB/SmolLM2-135M"] * 2
