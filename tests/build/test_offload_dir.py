"""calibrate --hidden-offload-dir: the memory-mapped file lives in a private folder inside DIR, and only
that folder is removed afterwards (also on error); the user's files in DIR are never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dive_ds.build.calib_pass import CalibConfig, streaming_stats
from tests.fixtures.procs import cli, one_line_error, snapshot
from tests.fixtures.tiny import save_tiny_llama


def _user_scratch(root: Path) -> Path:
    scratch = root / "scratch"
    (scratch / "other_job").mkdir(parents=True)
    (scratch / "notes.txt").write_text("my only copy")
    (scratch / "other_job" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return scratch


def test_offload_dir_keeps_everything_it_did_not_create(tmp_path, monkeypatch):
    import dive_ds.build.calib_pass as calibrate

    save_tiny_llama(tmp_path / "m", seed=2)
    windows = {"a": torch.randint(0, 97, (4, 8)), "b": torch.randint(0, 97, (3, 8))}
    scratch = _user_scratch(tmp_path)
    before = snapshot(scratch)
    used = []
    real = calibrate._hidden_buffer

    def spy(shape, folder):  # the memory-mapped file goes into a new, empty folder inside scratch
        used.append(folder)
        assert Path(folder).parent == scratch and Path(folder).is_dir() and not any(Path(folder).iterdir())
        return real(shape, folder)

    st_ram, _ = streaming_stats(tmp_path / "m", windows, CalibConfig(batch_size=3, progress=False))
    monkeypatch.setattr(calibrate, "_hidden_buffer", spy)
    st_off, _ = streaming_stats(
        tmp_path / "m", windows, CalibConfig(batch_size=3, progress=False, hidden_offload_dir=str(scratch))
    )
    assert len(used) == 1 and not Path(used[0]).exists()  # the private folder is gone
    torch.testing.assert_close(st_ram.sumsq_DLF, st_off.sumsq_DLF, rtol=0, atol=0)
    assert snapshot(scratch) == before  # the user's files, untouched, and nothing left behind


def test_offload_dir_is_cleaned_on_error_too(tmp_path, monkeypatch):
    import dive_ds.build.calib_pass as calibrate

    save_tiny_llama(tmp_path / "m", seed=2)
    scratch = _user_scratch(tmp_path)
    before = snapshot(scratch)
    calls = {"n": 0}
    real = calibrate.build_layer

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # after the memory-mapped file is written
            raise RuntimeError("simulated failure in layer 1")
        return real(*args, **kw)

    monkeypatch.setattr(calibrate, "build_layer", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        streaming_stats(
            tmp_path / "m",
            {"a": torch.randint(0, 97, (4, 8))},
            CalibConfig(progress=False, hidden_offload_dir=str(scratch)),
        )
    assert calls["n"] == 2
    assert snapshot(scratch) == before


def test_offload_dir_that_is_a_file_is_refused_before_work(tmp_path, capsys):
    save_tiny_llama(tmp_path / "m")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    reg = tmp_path / "reg.json"
    reg.write_text(json.dumps({"domains": {"a": {"source": {"type": "local", "files": "docs.jsonl"}}}}))
    (tmp_path / "afile").write_text("not a folder")
    before = snapshot(tmp_path)
    argv = ["calibrate", "--model", str(tmp_path / "m"), "--domains", str(reg), "--out", str(tmp_path / "out"),
            "--hidden-offload-dir", str(tmp_path / "afile")]  # fmt: skip
    assert cli(argv, capsys) == 2
    assert "--hidden-offload-dir" in one_line_error(capsys) and snapshot(tmp_path) == before
    # --force never lets calibrate replace its own input
    argv = [
        "calibrate",
        "--model",
        str(tmp_path / "m"),
        "--domains",
        str(reg),
        "--out",
        str(tmp_path),
        "--force",
    ]
    assert cli(argv, capsys) == 2
    assert "an input of this run; choose another --out" in one_line_error(capsys)
    assert snapshot(tmp_path) == before
