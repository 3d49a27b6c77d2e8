"""Hostile cases, as a table: what a user can type or hit, the exit code and the one line they get, and what
must still exist afterwards. Issue 21's cases not covered by a row here live in tests/cli/test_atomic.py (one
writer per output, a full disk, a kill during evaluate, nothing a run did not write deleted)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dive_ds.cli import main
from dive_ds.io.loading import check_tokenizer_fits
from dive_ds.train.config_load import run_config_from_dict
from tests.fixtures.tiny import make_tiny_calibration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, its calibration and MoE; a second model of the same shapes (other weights) with its
    MoE; a copy of the calibration holding a token id beyond the vocabulary."""
    root = tmp_path_factory.mktemp("hostile")
    model, calib = make_tiny_calibration(root / "a", n_domains=2)
    other_model, other_calib = make_tiny_calibration(root / "b", n_domains=2, seed=1)
    for c, out in ((calib, root / "moe"), (other_calib, root / "moe-other")):
        args = ["reconstruct", "--calib", str(c), "--method", "nomining", "--experts", "2", "--out", str(out)]
        assert main(args) == 0
    big = root / "calib-bigvocab"
    big.mkdir()
    for f in calib.iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    samples = load_file(big / "samples.safetensors")
    key = next(k for k in samples if k.startswith("calib."))
    samples[key][0, 0] = 10**6
    save_file(samples, big / "samples.safetensors")
    bad = root / "moe-badrouter"  # a router tensor of the wrong shape (a hand-edited or corrupt folder)
    bad.mkdir()
    for f in (root / "moe").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model-layer-00000.safetensors"
    tensors = load_file(shard)
    w = tensors["model.layers.0.mlp.gate.weight"]
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    return {"root": root, "model": model, "calib": calib, "moe": root / "moe", "moe_other": root / "moe-other",
            "calib_bigvocab": big, "moe_badrouter": bad}  # fmt: skip


CASES = [
    # (id, command, exit code, the one line contains, paths that must not exist afterwards)
    ("experts-beyond-the-ffn", "reconstruct --calib {calib} --method nomining --experts 1000000 --out {root}/x",
     2, "the model's FFN has", ["{root}/x"]),
    ("fit-router-calibration-of-another-model", "fit-router --moe {moe_other} --calib {calib} --out {root}/x",
     2, "was reconstructed from another model", ["{root}/x"]),
    ("fit-router-calibration-of-another-tokenizer", "fit-router --moe {moe} --calib {calib_bigvocab} --out {root}/x",
     2, "holds token id 1000000 but", ["{root}/x"]),
    ("export-a-router-of-the-wrong-shape", "export {moe_badrouter} --format portable --out {root}/x",
     2, "holds model.layers.0.mlp.gate.weight of shape", ["{root}/x"]),
    ("mine-into-its-own-calibration", "mine --calib {calib} --experts 2 --out {calib}", 2, "an input of this run", []),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_case(case, world, capsys):
    _, command, code, message, absent = case
    args = [a.format(**world) for a in command.split()]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    for p in absent:
        assert not Path(p.format(**world)).exists()
    assert (world["calib"] / "manifest.json").is_file() and (world["moe"] / "config.json").is_file()


@pytest.mark.parametrize(
    "out, where",
    [("{m}", "is model.path"), ("{m}/run", "is inside model.path"), ("{root}", "contains model.path")],
)
def test_a_retrain_never_writes_into_its_input(out, where, tmp_path):
    m = tmp_path / "moe"
    with pytest.raises(ValueError, match=f"out_dir .* {where} .*a run never writes into its input"):
        run_config_from_dict({"out_dir": out.format(m=m, root=tmp_path), "model": {"path": str(m)},
                              "stages": {"experts": {"steps": 1}}})  # fmt: skip


def test_a_tokenizer_of_another_model_is_refused_by_its_size():
    check_tokenizer_fits(151665, 151936)  # Qwen2.5 pads 271 rows
    check_tokenizer_fits(100015, 102400)  # DeepSeek-LLM-7B pads about 2.4k
    check_tokenizer_fits(49152, 49152)
    with pytest.raises(ValueError, match="does not belong to this model"):
        check_tokenizer_fits(32000, 49152)  # Llama-2's tokenizer on SmolLM2
    with pytest.raises(ValueError, match="does not belong to this model"):
        check_tokenizer_fits(49153, 49152)


def test_home_and_variables_in_registry_paths_are_expanded(tmp_path, monkeypatch):
    from dive_ds.data.registry import load_registry

    (tmp_path / "t.txt").write_text("some text\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DIVE_TEST_DIR", str(tmp_path))
    reg = tmp_path / "sub" / "reg.json"
    reg.parent.mkdir()
    reg.write_text(json.dumps({"domains": {
        "a": {"source": {"type": "local", "files": "~/t.txt"}},
        "b": {"source": {"type": "local", "files": ["$DIVE_TEST_DIR/t.txt"]}},
    }}))  # fmt: skip
    r = load_registry(reg)
    assert [d.source.files for d in r.domains.values()] == [(str(tmp_path / "t.txt"),)] * 2
    os.environ.pop("DIVE_UNSET_VAR", None)
    reg.write_text(
        json.dumps({"domains": {"a": {"source": {"type": "local", "files": "$DIVE_UNSET_VAR/t.txt"}}}})
    )
    with pytest.raises(ValueError, match="names an unset environment variable"):
        load_registry(reg)


def test_fit_router_reports_no_nan_accuracy_on_few_windows(world):
    """2 windows per domain, held out every 8th: the accuracy is measured on the windows held out over all
    domains, never nan (issue 21's case 10; tests/build/test_routerfit.py checks the count)."""
    from dive_ds.build.fit_router import run_fit_router
    from dive_ds.build.router_config import RouterFitConfig

    cfg = RouterFitConfig(progress=False, windows_per_domain=2, holdout_every=3, max_iter=5)
    rep = run_fit_router(world["moe"], world["calib"], world["root"] / "fitted", cfg)
    assert torch.isfinite(torch.tensor(rep["mean_label_accuracy_heldout"]))


def test_a_global_batch_beyond_memory_is_refused(tmp_path):
    from dive_ds.train.retrain import check_batch_fits

    run = run_config_from_dict({"out_dir": str(tmp_path / "r"), "model": {"path": str(tmp_path / "m")},
                                "train": {"global_batch_size": 10**9}, "stages": {"experts": {"steps": 1}}})  # fmt: skip
    with pytest.raises(ValueError, match=r"their ids alone need 8192 GB and this machine has 24 GB"):
        check_batch_fits(run, memory=24 * 10**9)
    check_batch_fits(run_config_from_dict({"model": {"path": "m"}, "stages": {"experts": {"steps": 1}}}))


def test_a_disk_too_small_is_refused_before_the_work(world, monkeypatch, capsys):
    """fit-router and reconstruct check the free space before fitting or writing (a full disk mid-write is
    tests/cli/test_atomic.py's case)."""
    import dive_ds.io.atomic as atomic

    monkeypatch.setattr(atomic, "free_bytes", lambda path: 1000)
    out = world["root"] / "x"
    assert (
        main(["fit-router", "--moe", str(world["moe"]), "--calib", str(world["calib"]), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "the fitted MoE at --out" in err and "only 0.00 GB is free there" in err and not out.exists()
    args = [
        "reconstruct",
        "--calib",
        str(world["calib"]),
        "--method",
        "nomining",
        "--experts",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 2
    assert "the MoE's experts at --out" in capsys.readouterr().err and not out.exists()


def test_compare_reuses_a_model_only_from_the_same_calibration_content(world, tmp_path):
    """`compare --reuse-models` once compared the calibration's path: a calibration replaced at that path
    kept its stale models. Now its fingerprint decides."""
    from dive_ds.build.compare import _reusable

    calib = tmp_path / "calib"
    calib.mkdir()
    for f in world["calib"].iterdir():
        (calib / f.name).write_bytes(f.read_bytes())
    moe = tmp_path / "moe"
    assert (
        main(
            [
                "reconstruct",
                "--calib",
                str(calib),
                "--method",
                "nomining",
                "--experts",
                "2",
                "--out",
                str(moe),
            ]
        )
        == 0
    )
    meta = json.loads((moe / "dive_experts.json").read_text())
    assert _reusable(moe, meta["reconstruction"], None, calib)
    samples = load_file(calib / "samples.safetensors")  # another calibration at the same path
    key = next(k for k in samples if k.startswith("calib."))
    samples[key][0, 0] += 1
    save_file(samples, calib / "samples.safetensors")
    assert not _reusable(moe, meta["reconstruction"], None, calib)
