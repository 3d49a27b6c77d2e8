"""Bad input, one class per test: numbers out of range, non-finite weights, inputs that used to end in a
traceback. Each case: exit status 2, one line naming the problem, and the folder tree unchanged."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.train.config_load import run_config_from_dict
from tests.fixtures import REPO
from tests.fixtures.procs import cli, one_line_error, snapshot
from tests.fixtures.tiny import make_tiny_calibration
from tests.fixtures.train_setup import ZERO2, base_run, load_state, make_tiny_setup

pytestmark = [  # torch deprecates collective names DeepSpeed 0.19 still calls
    pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_scatter_tensor.*:FutureWarning"),
]


# --------------------------------------------------------------------------- numeric flags (parse time)

NUMERIC = [
    ("calibrate --demo --seq-len 0", "argument --seq-len: 0: use an integer >= 2"),
    ("calibrate --demo --samples-per-domain 0", "argument --samples-per-domain: 0: use an integer >= 1"),
    ("calibrate --demo --eval-windows 0", "argument --eval-windows: 0: use an integer >= 1"),
    ("calibrate --demo --batch-size -3", "argument --batch-size: -3: use an integer >= 1"),
    ("calibrate --demo --seed -1", "argument --seed: -1: use an integer >= 0"),
    (
        "mine --calib C --experts 2 --out O --eval-windows -1",
        "argument --eval-windows: -1: use an integer >= 1",
    ),
    ("mine --calib C --experts 0 --out O", "argument --experts: 0: use an integer >= 1"),
    (
        "mine --calib C --experts 2 --out O --prune-ratio 1",
        "argument --prune-ratio: 1: use a ratio 0 <= r < 1",
    ),
    ("reconstruct --calib C --out O --top-k 0", "argument --top-k: 0: use an integer >= 1"),
    ("reconstruct --calib C --out O --prune-ratio nan", "argument --prune-ratio: nan: use a finite number"),
    ("fit-router --moe M --calib C --out O --max-iter 0", "argument --max-iter: 0: use an integer >= 1"),
    ("fit-router --moe M --calib C --out O --l2 -1", "argument --l2: -1: use a number >= 0"),
    ("evaluate M --calib C --eval-windows 0", "argument --eval-windows: 0: use an integer >= 1"),
    ("evaluate M --calib C --batch-size 0", "argument --batch-size: 0: use an integer >= 1"),
    ("compare --calib C --groups G --out O --lr 0", "argument --lr: 0: use a number > 0"),
    ("compare --calib C --groups G --out O --steps 1e3", "argument --steps: '1e3' is not an integer"),
    ("plan --model llama2-70b --gpu-mem inf", "argument --gpu-mem: inf: use a finite number"),
    ("demo --retrain-steps 0 -1", "argument --retrain-steps: -1: use an integer >= 0"),
    ("demo --seq-len 1", "argument --seq-len: 1: use an integer >= 2"),
]


@pytest.mark.parametrize("argv,message", NUMERIC)
def test_numeric_flags_are_checked_at_parse_time(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative C, O, M, G: nothing may appear here
    assert cli(argv.split(), capsys) == 2
    assert message in one_line_error(capsys)
    assert snapshot(tmp_path) == {}


def test_launcher_flags_and_run_config_numbers(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import retrain as launcher
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as e:
        cli(["--local-rank", "-1"], capsys, launcher.main)
    assert e.value.code == 2 and "argument --local_rank/--local-rank: -1" in one_line_error(
        capsys, "retrain: error: "
    )
    for raw, message in [
        ({"stages": {"experts": {"lr": float("nan")}}}, "stages.experts.lr=nan; use a finite number"),
        ({"data": {"weights": {"a": float("inf")}}}, "data.weights.a=inf; use a finite number"),
        ({"train": {"seed": -1}}, "train.seed=-1; use seeds >= 0"),
        ({"data": {"overfit_sequences": -2}}, "data.overfit_sequences=-2"),
        ({"eval": {"seq_len": 1}}, "eval.seq_len=1; use >= 2"),
        ({"model": {"max_abs_weight": 0.0}}, "model.max_abs_weight=0.0; use a bound > 0"),
    ]:
        with pytest.raises(ValueError, match="run config: ") as e:
            run_config_from_dict({"model": {"path": "m"}} | raw)
        assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- corrupt or inconsistent inputs


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A tiny dense model with a real tokenizer and a calibration of another tiny model, plus broken copies."""
    from dive_ds.io.loading import demo_model_dir
    from tests.fixtures.tiny import save_tiny_llama

    root = tmp_path_factory.mktemp("bad")
    dense, calib = make_tiny_calibration(root / "c")
    tok = root / "tok"
    save_tiny_llama(tok, vocab_size=49152, hidden_size=16, intermediate_size=24, num_hidden_layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, tok / f)

    def broken(src: Path, name: str, edit) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        edit(dst)
        return dst

    def poison(folder: Path, key: str, value: float) -> None:
        state = load_file(folder / "model.safetensors")
        state[key][0, 0] = value
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    def config_without_layers(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        del config["num_hidden_layers"]
        (folder / "config.json").write_text(json.dumps(config))

    def truncate(folder: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    files = {
        "docs.jsonl": "\n".join(json.dumps({"text": f"word {i} " * 300}) for i in range(40)),
        "bad.jsonl": json.dumps({"text": "a b c"}) + "\n" + json.dumps({"text": "d e"}) + "\n{not json\n",
        "reg.json": json.dumps({"domains": {"a": {"source": {"type": "local", "files": "docs.jsonl"}}}}),
        "reg_badjson.json": json.dumps(
            {"domains": {"a": {"source": {"type": "local", "files": "bad.jsonl"}}}}
        ),
        "reg_badtxt.json": json.dumps({"domains": {"a": {"source": {"type": "local", "files": "bad.txt"}}}}),
        "reg_dup.yaml": "domains:\n  a:\n    source: {type: local, files: docs.jsonl}\n"
        "  a:\n    source: {type: local, files: bad.jsonl}\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "bad.txt").write_bytes(b"fine\n\xff\xfe not utf-8\n")
    moe = root / "moe"
    from dive_ds.cli import main

    assert main(["reconstruct", "--calib", str(calib), "--method", "random-split", "--experts", "2",
                 "--out", str(moe)]) == 0  # fmt: skip

    def too_many_groups(folder: Path) -> None:
        meta = json.loads((folder / "dive_experts.json").read_text())
        meta["groups"] = {f"g{i}": [f"dom{i}"] for i in range(4)}
        (folder / "dive_experts.json").write_text(json.dumps(meta))

    return {
        "root": root,
        "calib": calib,
        "dense": dense,
        "tok": tok,
        "inf": broken(tok, "inf", lambda d: poison(d, "model.layers.1.mlp.up_proj.weight", float("inf"))),
        "nan": broken(dense, "nan", lambda d: poison(d, "model.layers.1.mlp.down_proj.weight", float("nan"))),
        "trunc": broken(tok, "trunc", truncate),
        "nolayers": broken(tok, "nolayers", config_without_layers),
        "moe_groups": broken(moe, "moe_groups", too_many_groups),
    }


CAL = ["--samples-per-domain", "2", "--seq-len", "16", "--eval-windows", "1", "--no-progress"]
CORRUPT = [
    ("calibrate --model {inf} --domains {root}/reg.json",
     "tensor model.layers.1.mlp.up_proj.weight holds 1 non-finite value(s) (NaN/Inf)"),
    ("reconstruct --calib {calib} --model {nan} --method random-split --experts 2",
     "tensor model.layers.1.mlp.down_proj.weight holds 1 non-finite value(s)"),
    ("calibrate --model {trunc} --domains {root}/reg.json", "trunc/model.safetensors: cannot read this safetensors file"),
    ("calibrate --model {nolayers} --domains {root}/reg.json", "nolayers/config.json lacks num_hidden_layers"),
    ("calibrate --model {tok} --domains {root}/reg_badjson.json", "bad.jsonl, line 3: not a JSON object"),
    ("calibrate --model {tok} --domains {root}/reg_badtxt.json", "bad.txt, line 2: not UTF-8"),
    ("calibrate --model {tok} --domains {root}/reg_dup.yaml", "key 'a' appears twice in one mapping (line 4)"),
    ("calibrate --model {root}/nowhere --domains {root}/reg.json", "nowhere does not exist; check the path"),
    ("evaluate {moe_groups} --calib {calib}", "`groups` must map at most num_local_experts=2 group names"),
    ("evaluate {dense} --calib {calib} --out {root}/reg.json", "exists and is not a folder"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", CORRUPT)
def test_corrupt_inputs_fail_in_one_line_naming_the_problem(bad, argv, message, capsys):
    args = argv.format(**bad).split()
    if "--model" in args and args[0] in ("calibrate", "reconstruct"):
        args += ["--out", str(bad["root"] / "out")] + (CAL if args[0] == "calibrate" else [])
    before = snapshot(bad["root"])
    assert cli(args, capsys) == 2, args
    assert message in one_line_error(capsys)
    assert snapshot(bad["root"]) == before  # nothing written, nothing left behind


def test_deepspeed_json_section_that_is_not_a_mapping(tmp_path):
    from dive_ds.train.ds_config import resolve_ds_config

    run = run_config_from_dict({"model": {"path": "m"}})
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for section, value in [("fp16", True), ("bf16", "yes"), ("zero_optimization", 2)]:
        with pytest.raises(ValueError, match=f"ds.json: {section} is {value!r}, not a mapping") as e:
            resolve_ds_config(ds | {section: value}, run, 1, "cpu", "ds.json")
        assert "\n" not in str(e.value)
    (tmp_path / "run.yaml").write_text("model: {path: a}\nmodel: {path: b}\n")
    from dive_ds.train.config_load import load_run_config

    with pytest.raises(ValueError, match="key 'model' appears twice in one mapping"):
        load_run_config(tmp_path / "run.yaml")


# --------------------------------------------------------------------------- a corrupt committed checkpoint


def test_corrupt_checkpoint_falls_back_to_the_previous_complete_one(world, tmp_path, capsys):
    """A truncated file in the latest committed checkpoint: named, the previous one (keep: 2) is resumed,
    and the stage ends with exactly the weights of the uninterrupted run; with none left, one line."""
    from dive_ds.train.config_load import read_mapping
    from dive_ds.train.retrain import train

    setup = make_tiny_setup(tmp_path / "tiny")
    out = tmp_path / "run"
    raw = base_run(
        setup,
        out,
        stages={"router": {"steps": 4, "lr": 0.05}, "experts": {"enabled": False}},
        checkpoint={"every": 2, "keep": 2},
        eval={"every": 0, "windows_per_domain": 1, "at_start": False},
        logging={"tensorboard": False},
    )
    run, ds = run_config_from_dict(raw), read_mapping(ZERO2)
    train(run, ds, str(ZERO2))
    stage = out / "stages" / "router"
    reference = load_state(stage / "model")

    def killed_before_export_with_truncated(*tags):  # the state a kill after the last save leaves
        shutil.rmtree(stage / "model")
        shutil.rmtree(out / "model")
        for tag in tags:
            f = sorted((stage / "checkpoints" / tag).glob("*model_states.pt"))[0]
            f.write_bytes(f.read_bytes()[:200])

    killed_before_export_with_truncated("step_00000004")
    capsys.readouterr()
    train(run, ds, str(ZERO2))
    printed = capsys.readouterr().out
    assert f"checkpoint {stage / 'checkpoints' / 'step_00000004'} cannot be loaded (" in printed, printed
    assert f"resumed from {stage / 'checkpoints' / 'step_00000002'} at step 2" in printed
    final = load_state(stage / "model")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)

    killed_before_export_with_truncated("step_00000002", "step_00000004")
    with pytest.raises(
        ValueError, match="step_00000002 cannot be loaded .* no earlier complete checkpoint"
    ) as e:
        train(run, ds, str(ZERO2))
    assert "\n" not in str(e.value) and not (stage / "model").exists()
