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
from dive_ds.train.config import run_config_from_dict
from tests.helpers import cli, make_tiny_calibration, one_line_error, snapshot

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(SystemExit) as e:
        cli(argv.split(), capsys)
    assert e.value.code == 2
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
