"""Bad input to calibrate: one line, non-zero exit, nothing written."""

import json
import shutil

import pytest
from transformers import GPT2Config

from dive_ds.cli import main
from tests.fixtures.tiny import save_tiny_llama


def _registry(tmp_path, n_docs=50, words=400):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "\n".join(json.dumps({"text": " ".join(f"w{i}x{j}" for j in range(words))}) for i in range(n_docs))
    )
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps({"domains": {"a": {"source": {"type": "local", "files": "docs.jsonl"}}}}))
    return reg


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dive-ds: error: "), lines
    return lines[0]


def test_model_without_gated_mlp(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "gpt2"),
                "--domains",
                str(_registry(tmp_path)),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "model_type 'gpt2' has no supported gated MLP" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_tokenizer_model_mismatch(tmp_path, capsys):
    from dive_ds.io.loading import demo_model_dir

    save_tiny_llama(tmp_path / "m")  # vocab 97
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, tmp_path / "m" / f)  # SmolLM2's 49,152-token tokenizer
    capsys.readouterr()
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "m"),
                "--domains",
                str(_registry(tmp_path)),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "does not belong to this model" in _err(capsys)


def test_too_little_text_and_foreign_out_dir(tmp_path, capsys):
    from dive_ds.io.loading import demo_model_dir

    save_tiny_llama(tmp_path / "m", vocab_size=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, tmp_path / "m" / f)
    reg = _registry(tmp_path, n_docs=40, words=50)  # about 4 documents fall in the selection set
    capsys.readouterr()
    args = [
        "calibrate",
        "--model",
        str(tmp_path / "m"),
        "--domains",
        str(reg),
        "--seq-len",
        "32",
        "--eval-windows",
        "1",
    ]
    assert main([*args, "--samples-per-domain", "500", "--out", str(tmp_path / "out")]) == 2
    assert "domain 'a' has only" in _err(capsys) and not (tmp_path / "out").exists()
    assert main([*args, "--samples-per-domain", "4", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    capsys.readouterr()
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["domains"][0]["calib_tokens"] == 4 * 32
    # same run again: reused; another run into the same folder: refused
    assert main([*args, "--samples-per-domain", "4", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert main([*args, "--samples-per-domain", "5", "--out", str(tmp_path / "out")]) == 2
    assert "holds a different run" in _err(capsys)


@pytest.mark.parametrize("argv", [["calibrate", "--help"], ["mine", "--help"], ["reconstruct", "--help"]])
def test_help_documents_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_evaluate_from_registry_scores_the_evaluation_set(tmp_path, capsys):
    """`evaluate --calib` scores the calibration's selection windows, `evaluate --domains` the evaluation set of
    the same split (`--seed`): other text, never calibrated or selected on."""
    from dive_ds.build.evaluate import registry_eval_windows
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.split import SplitConfig, split_texts
    from dive_ds.io.loading import demo_model_dir

    save_tiny_llama(tmp_path / "m", vocab_size=49152)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, tmp_path / "m" / f)
    reg = _registry(tmp_path, n_docs=60, words=60)
    common = ["--seq-len", "32", "--eval-windows", "2", "--seed", "3"]
    assert main(["calibrate", "--model", str(tmp_path / "m"), "--domains", str(reg), "--samples-per-domain", "4",
                 *common, "--out", str(tmp_path / "cal"), "--no-progress"]) == 0  # fmt: skip
    assert (
        main(
            ["evaluate", str(tmp_path / "m"), "--calib", str(tmp_path / "cal"), "--out", str(tmp_path / "e1")]
        )
        == 0
    )
    assert (
        main(["evaluate", str(tmp_path / "m"), "--domains", str(reg), *common, "--out", str(tmp_path / "e2")])
        == 0
    )
    e1 = json.loads((tmp_path / "e1" / "eval.json").read_text())["router"]
    e2 = json.loads((tmp_path / "e2" / "eval.json").read_text())["router"]
    assert e1.keys() == e2.keys() and e1 != e2 and e1["a"] > 1.0 and e2["a"] > 1.0
    recorded = json.loads((tmp_path / "cal" / "split.json").read_text())["a"]
    docs = list(iter_documents(load_registry(reg).domains["a"]))
    parts = split_texts(docs, SplitConfig(seed=3))
    assert recorded["select"]["ids"] == [i for s in parts["select"] for i in s.ids]  # the split --seed 3 made
    tok = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "m")
    evaluation = {t for s in parts["eval"] for t in tok(s.text, add_special_tokens=False)["input_ids"]}
    w = registry_eval_windows(reg, tmp_path / "m", 2, 32, 3)["a"]
    assert w.shape == (2, 32) and set(w.flatten().tolist()) <= evaluation | {tok.eos_token_id}
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m"), "--out", str(tmp_path / "e3")]) == 2
    assert "nothing to evaluate: pass --calib DIR or --domains REGISTRY" in _err(capsys)
    both = ["--calib", str(tmp_path / "cal"), "--domains", str(reg)]
    assert main(["evaluate", str(tmp_path / "m"), *both, "--out", str(tmp_path / "e3")]) == 2
    assert "not both" in _err(capsys)
