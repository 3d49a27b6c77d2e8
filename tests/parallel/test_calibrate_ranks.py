"""`dive-ds calibrate` on many ranks, resumable per layer: 2 gloo ranks == 1 rank; a stopped pass
resumes to bitwise the same statistics; every refusal is one line before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import REPO
from tests.fixtures.procs import cli, one_line_error, snapshot, torchrun
from tests.fixtures.tiny import save_tiny_llama

LAUNCHER = str(REPO / "launchers" / "reconstruct.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-layer tiny model with the demo tokenizer, a 2-domain registry (2 x 2 batches of 2 windows),
    and the uninterrupted 1-rank run (checkpointing after every layer into a folder it creates)."""
    from dive_ds.io.loading import demo_model_dir

    root = tmp_path_factory.mktemp("calib-ranks")
    model = root / "m"
    save_tiny_llama(model, vocab_size=49152, hidden_size=16, intermediate_size=24, num_hidden_layers=4)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, model / f)
    domains = {}
    for name, word in (("a", "alpha"), ("b", "beta")):
        (root / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"{word} {i} " * 60}) for i in range(60)) + "\n"
        )
        domains[name] = {"source": {"type": "local", "files": f"{name}.jsonl"}}
    (root / "reg.json").write_text(json.dumps({"domains": domains}))
    args = [
        "calibrate",
        "--model",
        str(model),
        "--domains",
        str(root / "reg.json"),
        "--seq-len",
        "16",
        "--samples-per-domain",
        "4",
        "--eval-windows",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--token-clusters",
        "3",
    ]  # fmt: skip  (the clusters' k-means and sums go over the ranks and resume too)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the same kernels, so the sums compare tightly
    try:
        import dive_ds.cli

        rc = dive_ds.cli.main([*args, "--out", str(root / "one"), "--checkpoint-dir", str(root / "made")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert not (root / "made").exists()  # the checkpoints and the folder this run made are gone
    return {"root": root, "args": args, "one": root / "one"}


def _stats(folder: Path) -> dict[str, torch.Tensor]:
    """The domain statistics and the token clusters' (`clusters.` keys)."""
    return load_file(folder / "stats.safetensors") | {
        f"clusters.{k}": v for k, v in load_file(folder / "clusters.safetensors").items()
    }


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.dist
def test_two_gloo_ranks_equal_one_rank(setup, tmp_path):
    out = torchrun([LAUNCHER, *setup["args"], "--out", str(tmp_path / "two"), "--device", "cpu"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("calibration: ") == 1  # rank 0 alone reports (and writes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]
    one, two = _stats(setup["one"]), _stats(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-12, atol=1e-12, msg=k)
    assert (
        load_file(tmp_path / "two" / "samples.safetensors").keys()
        == load_file(setup["one"] / "samples.safetensors").keys()
    )
    m1, m2 = _manifest(setup["one"]), _manifest(tmp_path / "two")
    assert m1["identity"] == m2["identity"] and m1["identity"]["dtype"] == "fp32"
    p1, p2 = m1["pass"], m2["pass"]
    assert (p1["world_size"], p2["world_size"]) == (1, 2) and p2["device"] == "cpu"
    assert [r["tokens"] for r in p2["per_rank"]] == [64, 64] and p2["tokens"] == p1["tokens"] == 128


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run
    yield
    torch.set_num_threads(threads)


def test_stopped_pass_resumes_to_the_same_statistics(setup, tmp_path, capsys, monkeypatch, one_thread):
    ck, stop = tmp_path / "ck", tmp_path / "calib.stop"
    ck.mkdir()
    (ck / "notes.txt").write_text("the user's, kept")
    stop.touch()
    run = [
        *setup["args"],
        "--out",
        str(tmp_path / "out"),
        "--checkpoint-dir",
        str(ck),
        "--stop-file",
        str(stop),
    ]
    assert cli(run, capsys) == 3
    assert "stopped after layer 1/4; relaunch the same command to resume" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    (folder,) = [p for p in ck.iterdir() if p.name.startswith("calibrate-")]
    state = json.loads((folder / "state.json").read_text())
    assert (state["layers_done"], state["world_size"]) == (1, 1)
    assert sorted(p.name for p in folder.iterdir()) == ["rank0-layer1.safetensors", "state.json"]
    stop.unlink()
    (folder / "mine.txt").write_text("x")
    assert cli(run, capsys) == 2
    assert "holds files this run did not write (mine.txt)" in one_line_error(capsys)
    (folder / "mine.txt").unlink()

    before = snapshot(tmp_path)
    ranks2 = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "9",
    }
    for extra, env, message in [
        ([], ranks2, "after layer 1/4 written by 1 ranks, but 2 were launched; relaunch with 1 ranks"),
        (["--batch-size", "1"], {}, "holds a checkpoint of another calibration"),
        (["--seed", "7", "--out", str(tmp_path / "out7")], {}, "holds a checkpoint of another calibration"),
    ]:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            argv = [*run, *extra]
            assert cli(argv, capsys) == 2, argv
            assert message in one_line_error(capsys), argv
    assert snapshot(tmp_path) == before

    assert cli(run, capsys) == 0  # resumes at layer 2
    ref, got = _stats(setup["one"]), _stats(tmp_path / "out")
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # bitwise: hidden states and float64 sums restored
    assert _manifest(tmp_path / "out")["pass"]["resumed_after_layer"] == 1
    assert sorted(p.name for p in ck.iterdir()) == ["notes.txt"]  # only the checkpoint this run made is gone


def test_refusals_are_one_line_before_work(setup, tmp_path, capsys, monkeypatch):
    args = [*setup["args"], "--out", str(tmp_path / "out")]
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "calibrate-0123456789abcdef").mkdir()
    before = snapshot(tmp_path)
    monkeypatch.setattr("dive_ds.parallel.ranks.cpu_has_native_bf16", lambda: False)  # a CPU without bf16
    cases = [
        (["--device", "cuda"], {}, "no CUDA device is visible"),
        (["--dtype", "bf16", "--device", "cpu"], {}, "this CPU has no native bf16 matmuls"),
        (["--stop-file", str(tmp_path / "s")], {}, "--stop-file needs --checkpoint-dir"),
        (["--checkpoint-every", "2"], {}, "--checkpoint-every needs --checkpoint-dir"),
        (
            ["--checkpoint-dir", str(tmp_path / "ck")],
            {},
            "holds a checkpoint of another calibration (calibrate-0123456789abcdef",
        ),
        (
            [],
            {"WORLD_SIZE": "5", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"},
            "5 ranks but only 4 calibration batches",
        ),
    ]
    for extra, env, message in cases:
        if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
            continue
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert cli([*args, *extra], capsys) == 2, extra
            assert message in one_line_error(capsys), extra
    assert snapshot(tmp_path) == before
