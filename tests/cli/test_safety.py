"""Never delete what the run did not create, never run code from a checkpoint, never fill missing weights
at random. Each bad case: one-line error, exit 2, and the folder tree outside the run's own files unchanged."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.cli import main
from tests.fixtures import REPO
from tests.fixtures.procs import cli, one_line_error, snapshot
from tests.fixtures.tiny import make_tiny_calibration

ZERO2 = REPO / "ds_configs" / "zero2.json"


# --------------------------------------------------------------------------- reconstruct --out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model_dir, calib_dir = make_tiny_calibration(root)
    return {"root": root, "model": model_dir, "calib": calib_dir}


def _recon(tiny, out, *extra):
    return ["reconstruct", "--calib", str(tiny["calib"]), "--method", "random-split", "--experts", "2",
            "--out", str(out), *map(str, extra)]  # fmt: skip


def test_reconstruct_out_reuses_same_run_and_refuses_anything_else(tiny, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    calib_before = snapshot(tiny["root"])
    cases = [
        (_recon(tiny, foreign), "holds no dive_experts.json of this command; choose another --out or pass --force"),
        (_recon(tiny, tmp_path / "afile"), "is a file, not a folder"),
        (_recon(tiny, tiny["calib"], "--force"), "is the calibration"),
        (_recon(tiny, tiny["root"], "--force"), "contains the calibration"),
        (_recon(tiny, tmp_path / "sh", "--force", "--shards", "--node-rank", 0, "--nodes", 1,
                "--gpus-per-node", 1, "--ep", 1), "--force does not apply with --shards"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli(argv, capsys) == 2, argv
        assert message in one_line_error(capsys)
    assert snapshot(tmp_path) == before and snapshot(tiny["root"]) == calib_before

    out = tmp_path / "moe"
    assert cli(_recon(tiny, out), capsys) == 0
    capsys.readouterr()
    meta = json.loads((out / "dive_experts.json").read_text())
    assert set(meta["identity"]) == {"plan_fingerprint", "dense_model_fingerprint"}
    made = snapshot(out)
    assert cli(_recon(tiny, out), capsys) == 0  # the same run: reused, nothing rewritten
    assert "already holds this reconstruction; reusing it" in capsys.readouterr().out
    assert snapshot(out) == made
    assert cli(_recon(tiny, out, "--seed", 7), capsys) == 2  # other settings: refused
    assert "holds a different run (dive_experts.json: plan_fingerprint" in one_line_error(capsys)
    assert snapshot(out) == made

    # a model retrained from it carries the same dive_experts.json but other weights: not this run
    from transformers import AutoModelForCausalLM

    retrained = tmp_path / "retrained"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(retrained)
    shutil.copy2(out / "dive_experts.json", retrained / "dive_experts.json")
    kept = snapshot(retrained)
    assert cli(_recon(tiny, retrained), capsys) == 2
    assert "holds no dive_experts.json of this command" in one_line_error(capsys)
    assert snapshot(retrained) == kept

    # the same files with other router weights (what `dive-ds fit-router` writes): not this run either
    fitted = tmp_path / "fitted"
    shutil.copytree(out, fitted)
    layer = load_file(fitted / "model-layer-00001.safetensors")
    layer["model.layers.1.mlp.gate.weight"] = layer["model.layers.1.mlp.gate.weight"] * 2
    save_file(layer, fitted / "model-layer-00001.safetensors", metadata={"format": "pt"})
    kept = snapshot(fitted)
    assert cli(_recon(tiny, fitted), capsys) == 2
    assert "holds no dive_experts.json of this command" in one_line_error(capsys)
    assert snapshot(fitted) == kept

    # --force replaces, with exactly what a fresh run writes
    assert cli(_recon(tiny, out, "--seed", 7, "--force"), capsys) == 0
    assert cli(_recon(tiny, foreign, "--seed", 7, "--force"), capsys) == 0
    assert not (foreign / "thesis.tex").exists()
    assert json.loads((out / "dive_experts.json").read_text())["reconstruction"]["seed"] == 7
    for f in out.glob("*.safetensors"):
        a, b = load_file(f), load_file(foreign / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- retrain.py --consolidate --out


def _launcher():
    sys.path.insert(0, str(REPO / "launchers"))
    try:
        import retrain as launcher
    finally:
        sys.path.pop(0)
    return launcher


def _fake_checkpoint(root: Path, stage_meta: dict) -> Path:
    """A committed tag folder without DeepSpeed files: anything that reaches the loading fails loudly."""
    ckpt = root / "run" / "stages" / "experts" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / "dive_ds_stage.json").write_text(json.dumps(stage_meta))
    (ckpt / "latest").write_text("step_00000002")
    return ckpt


def test_consolidate_out_reuses_same_run_and_refuses_anything_else(tmp_path, capsys):
    import hashlib

    from dive_ds.train.planning import DONE_FILE

    launcher = _launcher()
    ckpt = _fake_checkpoint(tmp_path, {"stage": "experts", "input": str(tmp_path / "moe"), "step": 2})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("1,2,3")
    before = snapshot(tmp_path)
    for argv, message in [
        (["--consolidate", str(ckpt), "--out", str(foreign)], "holds no retrain_stage.json of this command"),
        (["--consolidate", str(ckpt), "--out", str(tmp_path / "run"), "--force"], "contains the checkpoint"),
        (["--consolidate", str(ckpt), "--out", str(tmp_path / "moe"), "--force"], "is the stage input"),
    ]:
        assert cli(argv, capsys, launcher.main) == 2, argv
        assert message in one_line_error(capsys, "retrain: error: ")
    assert snapshot(tmp_path) == before

    # an output this command wrote for this very checkpoint: reused without loading anything
    tag = ckpt / "step_00000002"
    identity = {
        "checkpoint": str(tag.resolve()),
        "stage_meta_sha256": hashlib.sha256((tag / "dive_ds_stage.json").read_bytes()).hexdigest()[:16],
    }
    done = tmp_path / "merged"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / DONE_FILE).write_text(json.dumps({"consolidated_from": str(tag), "identity": identity}))
    assert cli(["--consolidate", str(ckpt), "--out", str(done)], capsys, launcher.main) == 0
    assert "already holds this consolidation" in capsys.readouterr().out
    # the checkpoint was rewritten by another run since: its commit record differs -> refused
    (tag / "dive_ds_stage.json").write_text(json.dumps({"stage": "experts", "input": "other", "step": 2}))
    kept = snapshot(done)
    assert cli(["--consolidate", str(ckpt), "--out", str(done)], capsys, launcher.main) == 2
    assert "holds a different run (retrain_stage.json: stage_meta_sha256" in one_line_error(
        capsys, "retrain: error: "
    )
    assert snapshot(done) == kept


# --------------------------------------------------------------------------- RNG states: no pickle


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_crafted_rng_files_never_run_code(tmp_path):
    """A pickle with a code-running __reduce__ placed under the new and the old RNG file names: the
    trainer's resume path refuses both with one line and the code never runs."""
    from dive_ds.train import rng
    from dive_ds.train.checkpoint import load_checkpoint
    from dive_ds.train.config_load import read_mapping, run_config_from_dict
    from dive_ds.train.retrain import train
    from tests.fixtures.train_setup import base_run, make_tiny_setup

    marker = tmp_path / "code_ran"
    payload = pickle.dumps(_Payload(marker))
    tag = tmp_path / "ckpt" / "step_00000002"
    tag.mkdir(parents=True)

    class FakeEngine:  # DeepSpeed's part of a resume, stubbed: only dive_ds's own RNG file is read
        def load_checkpoint(self, *a, **kw):
            return str(tag), {"dive_ds": {"step": 2}}

    # 1. a pickle under the new name: not safetensors -> refused, nothing executed
    (tag / rng.RNG_FILE.format(0)).write_bytes(payload)
    with pytest.raises(
        ValueError, match=r"rng_state_rank0000.safetensors is not a valid dive_ds RNG state file"
    ):
        load_checkpoint(FakeEngine(), tag.parent, tag.name)
    torch.save(_Payload(marker), tag / rng.RNG_FILE.format(0))  # the same through torch.save's zip format
    with pytest.raises(ValueError, match="not a valid dive_ds RNG state file") as e:
        load_checkpoint(FakeEngine(), tag.parent, tag.name)
    assert "\n" not in str(e.value)
    assert not marker.exists()

    # 2. the old pickle name: never unpickled, refused with the way forward
    (tag / rng.RNG_FILE.format(0)).unlink()
    torch.save(_Payload(marker), tag / rng.LEGACY_RNG_FILE.format(0))
    with pytest.raises(
        ValueError, match=r"rng_state_rank0000.pt holds RNG states as a pickle .* never loaded"
    ):
        load_checkpoint(FakeEngine(), tag.parent, tag.name)
    assert not marker.exists()

    # 3. the same checkpoint as a run's latest: train() refuses before loading any model
    setup = make_tiny_setup(tmp_path / "tiny")
    raw = base_run(setup, tmp_path / "run")
    ckpt = tmp_path / "run" / "stages" / "router" / "checkpoints"
    shutil.copytree(tag.parent, ckpt)
    (ckpt / "step_00000002" / "dive_ds_stage.json").write_text("{}")
    (ckpt / "latest").write_text("step_00000002")
    from dive_ds.train.identity import run_identity, write_identity

    write_identity(tmp_path / "run", run_identity(run_config_from_dict(raw)))  # this run's own folder
    with pytest.raises(ValueError, match="holds RNG states as a pickle") as e:
        train(run_config_from_dict(raw), read_mapping(ZERO2), str(ZERO2))
    assert "delete the checkpoint's rng_state_rank" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()

    # control: the payload is real (unpickling it does run the code)
    torch.load(tag / rng.LEGACY_RNG_FILE.format(0), weights_only=False)
    assert marker.read_text() == "code ran"


def test_no_pickle_loading_left_in_dive_ds():
    """dive_ds and the launchers never call torch.load without weights_only=True, nor unpickle."""
    import re

    unpickling = re.compile(
        r"\bimport (cloud)?pickle\b|\bfrom (cloud)?pickle\b|\bpickle\.(loads?|Unpickler)\b|\bdill\b"
    )
    offenders = []
    for path in [*(REPO / "dive_ds").rglob("*.py"), *(REPO / "launchers").rglob("*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("torch.load(" in code and "weights_only=True" not in code) or unpickling.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- strict loading


def _drop_layer(src: Path, dst: Path, layer: int, keep_index: bool) -> None:
    """Copy a reconstructed MoE without one layer's shard file (index entries kept or dropped too)."""
    shutil.copytree(src, dst)
    name = f"model-layer-{layer:05d}.safetensors"
    (dst / name).unlink()
    if not keep_index:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def moe(tiny):
    out = tiny["root"] / "moe-plain"
    assert main(_recon(tiny, out, "--no-bias-compensation")) == 0  # zero biases: exportable
    return out


def test_missing_weights_are_refused_not_randomised(tiny, moe, tmp_path, capsys):
    from dive_ds.train.model import check_moe_folder, load_model

    dropped = tmp_path / "dropped"
    _drop_layer(moe, dropped, 1, keep_index=False)
    lost = tmp_path / "lost"
    _drop_layer(moe, lost, 1, keep_index=True)
    dense = tmp_path / "dense"  # a dense Llama with one tensor deleted from its single file
    shutil.copytree(tiny["model"], dense)
    state = load_file(dense / "model.safetensors")
    del state["model.layers.2.self_attn.q_proj.weight"]
    save_file(state, dense / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(tmp_path)
    cases = [
        (["evaluate", str(dropped), "--calib", str(tiny["calib"]), "--out", str(tmp_path / "e1")],
         "lacks 11 weight(s) of its model: model.layers.1."),
        (["evaluate", str(lost), "--calib", str(tiny["calib"]), "--out", str(tmp_path / "e2")],
         "model-layer-00001.safetensors is missing"),
        (["evaluate", str(dense), "--calib", str(tiny["calib"])],
         "lacks 1 weight(s) of its model: model.layers.2.self_attn.q_proj.weight"),
        (["export", str(dropped), "--out", str(tmp_path / "x1")], "lacks 11 weight(s)"),
        (["export", str(tiny["model"]), "--out", str(tmp_path / "x2")], "is a 'llama' model, not dive_moe"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli(argv, capsys) == 2, argv
        assert message in one_line_error(capsys)
    assert snapshot(tmp_path) == before
    for folder in (dropped, lost):  # retraining: refused when the run is checked, and when loading
        with pytest.raises(ValueError, match="lacks|is missing"):
            check_moe_folder(folder)
        with pytest.raises(ValueError, match="lacks|is missing"):
            load_model(folder, {}, zero3_init=False)
    # control: the complete folder loads and exports
    assert cli(["export", str(moe), "--out", str(tmp_path / "x3")], capsys) == 0
    assert (tmp_path / "x3" / "config.json").is_file()


def test_demo_replaces_only_its_own_router_fit(tmp_path):
    from dive_ds.build.demo import _remove_own_fit

    source = tmp_path / "moe-dive"
    source.mkdir()
    foreign = tmp_path / "moe-dive-fitted"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not this demo's router fit"):
        _remove_own_fit(foreign, source)
    (foreign / "router_fit.json").write_text(json.dumps({"moe": str(tmp_path / "elsewhere")}))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="is not this demo's router fit"):
        _remove_own_fit(foreign, source)
    assert snapshot(tmp_path) == before
    own = tmp_path / "own-fit"
    own.mkdir()
    (own / "router_fit.json").write_text(json.dumps({"moe": str(source.resolve())}))
    _remove_own_fit(own, source)
    assert not own.exists() and (foreign / "notes.txt").read_text() == "mine"


def test_demo_rerun_reuses_a_current_fit_and_moves_stale_evaluations_aside(tmp_path):
    """A rerun of the demo in its own folder: the router fit is reused only when it is of the same MoE,
    calibration and settings; an evaluation folder of another model or other windows is moved aside (never
    deleted), one of this very evaluation stays."""
    from dataclasses import asdict

    from dive_ds.build.demo import _clear_stale_eval, _fit_is_current
    from dive_ds.build.outputs import evaluation_identity
    from dive_ds.build.router_config import RouterFitConfig
    from dive_ds.io.fingerprint import folder_fingerprint

    calib, source, fitted = tmp_path / "calib", tmp_path / "moe-dive", tmp_path / "moe-dive-fitted"
    for d in (calib, source, fitted):
        d.mkdir()
    (calib / "stats.safetensors").write_bytes(b"stats")
    (source / "dive_experts.json").write_text('{"groups": {"a": ["x"]}}')
    (fitted / "dive_experts.json").write_text('{"groups": {"a": ["x"]}}')
    cfg = RouterFitConfig(windows_per_domain=8)
    record = {
        "moe": str(source.resolve()),
        "calibration_fingerprint": folder_fingerprint(calib),
        "config": asdict(cfg),
        "dtype": "float32",
    }
    (fitted / "router_fit.json").write_text(json.dumps(record))
    assert _fit_is_current(fitted, source, calib, cfg)
    assert _fit_is_current(fitted, source, calib, cfg, "fp32")
    assert not _fit_is_current(fitted, source, calib, cfg, "bf16")  # another precision
    assert not _fit_is_current(fitted, source, calib, RouterFitConfig(windows_per_domain=4))  # other settings
    (source / "dive_experts.json").write_text('{"groups": {"b": ["x"]}}')  # another reconstruction
    assert not _fit_is_current(fitted, source, calib, cfg)
    (source / "dive_experts.json").write_text('{"groups": {"a": ["x"]}}')
    (calib / "stats.safetensors").write_bytes(b"other stats")  # another calibration
    assert not _fit_is_current(fitted, source, calib, cfg)

    ev = {"registry": str(tmp_path / "eval_registry.json"), "eval_windows": 4, "seq_len": 256, "seed": 42}
    (tmp_path / "eval_registry.json").write_text("{}")
    flap = tmp_path / "moe-flap"
    flap.mkdir()
    (flap / "config.json").write_text("{}")
    current = evaluation_identity(flap, None, ev["registry"], 4, 256, 42, False, True)
    (tmp_path / "eval-flap").mkdir()
    (tmp_path / "eval-flap" / "eval.json").write_text(json.dumps({"identity": current}))
    (tmp_path / "eval-nomining").mkdir()
    (tmp_path / "eval-nomining" / "eval.json").write_text(json.dumps({"identity": current}))  # not its model
    for label in ("flap", "nomining", "random-split"):
        _clear_stale_eval(tmp_path, label, tmp_path / f"moe-{label}", False, True, ev)
    assert (tmp_path / "eval-flap" / "eval.json").is_file() and not (tmp_path / "eval-nomining").exists()
    moved = list(tmp_path.glob("superseded-*/eval-nomining/eval.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["identity"] == current
    # the precision is part of it: an fp32 evaluation is stale for a bf16 demo, a bf16 one current for it
    bf16 = ev | {"dtype": "bf16"}
    _clear_stale_eval(tmp_path, "flap", flap, False, True, bf16)
    assert not (tmp_path / "eval-flap").exists() and len(list(tmp_path.glob("superseded-*/eval-flap"))) == 1
    scored = evaluation_identity(flap, None, ev["registry"], 4, 256, 42, False, True, "bf16")
    assert scored == current | {"dtype": "bfloat16"}
    (tmp_path / "eval-flap").mkdir()
    (tmp_path / "eval-flap" / "eval.json").write_text(json.dumps({"identity": scored}))
    _clear_stale_eval(tmp_path, "flap", flap, False, True, bf16)
    assert (tmp_path / "eval-flap" / "eval.json").is_file()
