"""A folder belongs to one run: retrain's out_dir, mine's and evaluate's --out refuse another run's
folder in one line and change nothing; a checkpoint names its stage input by absolute path and
fingerprint, so consolidation works from any directory and refuses another model at that path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.train.config_load import read_mapping, run_config_from_dict
from dive_ds.train.identity import RUN_RECORD, claim_run_dir, run_identity, write_identity
from tests.fixtures.procs import cli, killed_at, one_line_error, snapshot
from tests.fixtures.tiny import make_tiny_calibration
from tests.fixtures.train_setup import ZERO2, base_run, load_state, make_tiny_setup

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*reduce_scatter_tensor.*:FutureWarning"),
]


def _other_model(src: Path, dst: Path, scale: float = 1.5) -> Path:
    """The same architecture and files as `src`, other weights (what a user may put at the same path)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    state = load_file(src / "model.safetensors")
    save_file({k: v * scale for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    s = make_tiny_setup(root)
    s["other"] = _other_model(s["model"], root / "other")
    return s


def _recorded_run(setup, out: Path, **sections) -> dict:
    """A run folder as a launch of `base_run(..., **sections)` leaves it: its identity, config, a finished stage."""
    raw = base_run(setup, out, **sections)
    write_identity(out, run_identity(run_config_from_dict(raw)))
    (out / "run_config.yaml").write_text(json.dumps(run_config_from_dict(raw).to_dict()))
    (out / "stages" / "router" / "model").mkdir(parents=True)
    (out / "stages" / "router" / "model" / "retrain_stage.json").write_text("{}")
    return raw


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s, raw: raw["model"].update(path=str(s["other"])), "holds a different run (model.path"),
        (lambda s, raw: raw["data"].update(seq_len=64), "holds a different run (data.seq_len: 32 != 64)"),
        (lambda s, raw: raw["stages"]["experts"].update(lr=0.5), "(stages.experts.lr: 0.01 != 0.5)"),
        (lambda s, raw: raw["train"].update(seed=7), "(train.seed: 42 != 7)"),
        (
            lambda s, raw: raw["stages"].update(router={"enabled": False}),
            "(stages: router, experts != experts)",
        ),
        (None, "model.fingerprint"),  # another model copied to the recorded path
        ("legacy", "(stages.experts.lr: 0.01 != 0.5)"),  # a folder from before run_identity.json
        ("foreign", "is not empty and holds no run_identity.json of a retraining run"),
        ("file", "exists and is not a folder"),
    ],
)
def test_retrain_out_dir_refuses_another_run(setup, tmp_path, change, message):
    from dive_ds.train.retrain import train

    model = tmp_path / "moe"
    shutil.copytree(setup["model"], model)
    own = dict(setup, model=model)
    out = tmp_path / "run"
    if change == "file":
        out.write_text("not a folder")
    elif change == "foreign":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    else:
        raw = _recorded_run(own, out)
        if change == "legacy":
            (out / RUN_RECORD).unlink()
    raw = base_run(own, out)
    if change is None:
        _other_model(setup["model"], model, scale=0.5)
    elif callable(change):
        change(own, raw)
    elif change == "legacy":
        raw["stages"]["experts"]["lr"] = 0.5
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert snapshot(tmp_path) == before


def test_retrain_same_run_resumes_extends_or_is_forced_aside(setup, world, tmp_path):
    """The same run (relaunched from another directory, or with a stage added) is accepted; --force moves
    the other run's files aside (never deletes them) and trains afresh; its checkpoint consolidates from
    any directory and refuses a different model put at its input's path."""
    from dive_ds.train.export import consolidate_checkpoint
    from dive_ds.train.retrain import train

    model = tmp_path / "moe"
    shutil.copytree(setup["model"], model)
    own = dict(setup, model=model)
    out = tmp_path / "run"
    _recorded_run(own, out)
    same = run_identity(run_config_from_dict(base_run(own, out)))
    assert claim_run_dir(out, same, force=False) == "same"
    extended = base_run(own, out, stages={"continue": {"enabled": True, "steps": 2}})
    assert claim_run_dir(out, run_identity(run_config_from_dict(extended)), force=False) == "same"

    (out / "notes.txt").write_text("the user's")
    old = snapshot(out)
    small = dict(
        stages={"router": {"steps": 1, "lr": 0.5}, "experts": {"enabled": False}},
        checkpoint={"exclude_frozen": True},
        eval={"every": 0, "windows_per_domain": 1, "at_start": False},
        logging={"tensorboard": False},
    )
    raw = base_run(own, out, **small)
    train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2), force=True)
    moved = list(out.glob("superseded-*"))
    assert len(moved) == 1 and (out / "notes.txt").read_text() == "the user's"
    assert {f"{moved[0].name}/{k}": v for k, v in old.items() if k != "notes.txt"} == {
        k: v for k, v in snapshot(out).items() if k.startswith(moved[0].name + "/")
    }  # every earlier file kept, byte for byte
    assert json.loads((out / RUN_RECORD).read_text())["identity"]["stages"]["router"]["lr"] == 0.5

    # consolidate from another working directory: the input is found by its recorded absolute path
    ckpt = out / "stages" / "router" / "checkpoints"
    meta = json.loads((ckpt / "step_00000001" / "dive_ds_stage.json").read_text())
    assert meta["input"] == str(model.resolve()) and len(meta["input_fingerprint"]) == 16
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = Path("..") / "run" / "stages" / "router" / "checkpoints"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)
        # killed while writing the weights (no clean-up): nothing under the final name, then relaunched
        status = killed_at(
            1,
            "transformers.modeling_utils:safe_save_file",
            lambda: bool(consolidate_checkpoint(relative, "merged")) - 1,
        )
        assert status == 9 and not (elsewhere / "merged").exists()
        merged = consolidate_checkpoint(relative, "merged")
    final, stage_out = load_state(elsewhere / merged), load_state(out / "stages" / "router" / "model")
    assert final.keys() == stage_out.keys() and all(torch.equal(final[k], stage_out[k]) for k in final)

    _other_model(setup["model"], model, scale=0.5)  # another model at the recorded input path
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="has changed since it was recorded") as e:
        consolidate_checkpoint(ckpt, tmp_path / "merged2")
    assert "\n" not in str(e.value) and snapshot(tmp_path) == before


# --------------------------------------------------------------------------- mine --out, evaluate --out


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity-calib")
    model_dir, calib_dir = make_tiny_calibration(root)
    return {"root": root, "model": model_dir, "calib": calib_dir}


def test_mine_and_evaluate_out_refuse_another_runs_files(calib, tmp_path, capsys):
    mine = ["mine", "--calib", str(calib["calib"]), "--fast-only", "--experts"]
    evaluate = ["evaluate", str(calib["model"]), "--calib", str(calib["calib"]), "--no-oracle", "--out"]
    mined, evals, foreign = tmp_path / "mined", tmp_path / "evals", tmp_path / "foreign"
    assert cli([*mine, "2", "--out", str(mined)], capsys) == 0
    assert cli([*evaluate, str(evals), "--eval-windows", "2"], capsys) == 0
    foreign.mkdir()
    (foreign / "eval.md").write_text("a report of mine")
    (foreign / "groups.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    for argv, message in [
        (
            [*mine, "3", "--out", str(mined)],
            "holds a different run (mining.json: experts: 2 != 3); choose another --out (or empty it)",
        ),
        ([*mine, "2", "--out", str(foreign)], "is not empty and holds no mining.json of this command"),
        ([*mine, "2", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        ([*evaluate, str(evals), "--eval-windows", "1"], "holds another evaluation (eval_windows: 2 != 1)"),
        ([*evaluate, str(foreign)], "holds eval.md but not of a `dive-ds evaluate` run"),
        ([*evaluate, str(tmp_path / "afile")], "exists and is not a folder"),
        ([*evaluate, str(calib["model"])], "is the model"),
    ]:
        assert cli(argv, capsys) == 2, argv
        assert message in one_line_error(capsys), argv
    assert snapshot(tmp_path) == before
    # the same runs again: mining is reused as is, the evaluation rewrites only its own files
    assert cli([*mine, "2", "--out", str(mined)], capsys) == 0
    assert "already holds this mining run; reusing it" in capsys.readouterr().out
    (evals / "notes.txt").write_text("kept")
    assert cli([*evaluate, str(evals), "--eval-windows", "2"], capsys) == 0
    assert sorted(p.name for p in evals.iterdir()) == ["eval.json", "eval.md", "notes.txt", "tb"]
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("evals")} == {
        k: v for k, v in before.items() if not k.startswith("evals")
    }
