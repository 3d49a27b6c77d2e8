"""Registry evaluation windows are drawn and tokenized once per process for the same registry, tokenizer and
settings (the demo scores seven models of one tokenizer on the same windows)."""

import json
import shutil

import torch

from dive_ds.build.evaluate import registry_eval_windows
from tests.fixtures.tiny import bpe_tokenizer
from tests.fixtures.train_setup import write_tiny_registry


def test_windows_are_drawn_once_for_the_same_registry_tokenizer_and_settings(tmp_path):
    reg = write_tiny_registry(tmp_path)
    a, b = tmp_path / "model_a", tmp_path / "model_b"
    bpe_tokenizer(a)
    shutil.copytree(a, b)  # another model folder with the same tokenizer files
    (b / "config.json").write_text("{}")  # its own (non-tokenizer) files do not matter
    first = registry_eval_windows(reg, a, 2, 8, 42)
    assert sorted(first) == ["code", "prose"] and first["code"].shape == (2, 8)
    again = registry_eval_windows(reg, b, 2, 8, 42)
    assert all(again[d] is first[d] for d in first)  # the same tensors: not drawn again
    other_seed = registry_eval_windows(reg, a, 2, 8, 7)
    assert any(other_seed[d] is not first[d] for d in first)
    assert registry_eval_windows(reg, a, 3, 8, 42)["code"].shape == (3, 8)  # other settings: drawn for them
    assert torch.equal(registry_eval_windows(reg, a, 3, 8, 42)["code"][:2], first["code"])
    c = tmp_path / "model_c"
    bpe_tokenizer(c)
    conf = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps(conf | {"model_max_length": 77}))
    assert all(registry_eval_windows(reg, c, 2, 8, 42)[d] is not first[d] for d in first)  # another tokenizer
