"""dive_ds.io.atomic: complete-or-absent files and folders, nothing deleted that a run did not write, one
writer per output (real processes), and a full disk in one line."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dive_ds.io import atomic
from dive_ds.io.atomic import DiskFull, OutputBusy, OutputLock, lock_path, publish, staged_dir, staged_file
from tests.fixtures import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(KeyError), staged_file(target) as tmp:
        tmp.write_text("half")
        raise KeyError("killed mid-write")
    assert not target.exists() and _hidden(tmp_path) == []
    atomic.write_json(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n' and _hidden(tmp_path) == []


def test_a_folder_replaces_nothing_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")  # put there while a run works
    with staged_dir(out) as tmp:
        (tmp / "result.json").write_text("new")
    assert (out / "result.json").read_text() == "new"
    [aside] = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert (aside / "notes.txt").read_text() == "the user's"
    assert _hidden(tmp_path) == []


def test_an_empty_folder_is_simply_replaced_and_a_failed_run_leaves_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("boom")
    assert out.is_dir() and list(out.iterdir()) == [] and _hidden(tmp_path) == []
    with staged_dir(out) as tmp:
        (tmp / "x").write_text("done")
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def test_publish_twice_keeps_both_earlier_outputs(tmp_path):
    out = tmp_path / "out"
    for n in range(3):
        tmp = tmp_path / f"t{n}"
        tmp.mkdir()
        (tmp / "v").write_text(str(n))
        publish(tmp, out)
    assert (out / "v").read_text() == "2"
    texts = sorted(p.read_text() for p in out.rglob("v"))
    assert texts == ["0", "1", "2"]  # the first one nested inside the second's superseded folder


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "moe"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull) as e, staged_dir(out) as tmp:
        (tmp / "a").write_text("x")
        full()
    msg = str(e.value)
    assert "\n" not in msg and f"the disk filled up while writing {out}" in msg and "GB free now" in msg
    assert not out.exists() and _hidden(tmp_path) == []

    class SafetensorError(Exception):  # safetensors' own type reports ENOSPC in its text
        pass

    with pytest.raises(DiskFull), staged_file(tmp_path / "w.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiskFull, match=r"needs about 1000000000\.00 GB and only .* is free there"):
        atomic.check_free_space(out, 10**18)


HOLD = "import sys, time; from dive_ds.io.atomic import OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"  # noqa: E501


@pytest.fixture
def holder(tmp_path):
    """A real process holding the lock of tmp_path/out (a first run at work)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, env=ENV,
                         text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "held"
    yield p
    p.kill()
    p.wait()


COMMANDS = {
    "calibrate": ["calibrate", "--model", "M", "--domains", "R.json", "--out"],
    "mine": ["mine", "--calib", "C", "--experts", "2", "--out"],
    "reconstruct": ["reconstruct", "--calib", "C", "--experts", "2", "--out"],
    "fit-router": ["fit-router", "--moe", "M", "--calib", "C", "--out"],
    "evaluate": ["evaluate", "M", "--calib", "C", "--out"],
    "compare": ["compare", "--calib", "C", "--groups", "G", "--out"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_run_on_the_same_output_is_refused_naming_the_first(command, holder, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dive_ds.cli", *COMMANDS[command], str(tmp_path / "out")],
                       capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"is being written by another run (pid {holder.pid}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # the refused run wrote nothing


def test_retrain_on_a_locked_out_dir_is_refused(holder, tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "launchers/retrain.py"), "--deepspeed", str(REPO / "ds_configs/zero2.json"),
         "--config", str(REPO / "configs/demo_retrain.yaml"), "--set", f"out_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"is being written by another run (pid {holder.pid}" in r.stderr


def test_a_stale_lock_is_taken_over_and_said(tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(out)], env=ENV,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert dead.stdout.strip() == "held" and lock_path(out).exists()  # the process died holding it
    with OutputLock(out) as lock:
        assert lock.held and f'"pid": {os.getpid()}' in lock_path(out).read_text()
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()  # held by a live process: this one
    assert "took over the lock" in capsys.readouterr().err
    assert not lock_path(out).exists()  # released


def test_two_real_mine_runs_race_and_exactly_one_writes(tmp_path):
    from tests.fixtures.tiny import make_tiny_calibration

    _, calib = make_tiny_calibration(tmp_path, n_domains=4)
    cmd = [sys.executable, "-m", "dive_ds.cli", "mine", "--calib", str(calib), "--experts", "2",
           "--out", str(tmp_path / "out")]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]  # fmt: skip
    t0 = time.time()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "is being written by another run" in loser
    assert (tmp_path / "out" / "groups.json").is_file() and not lock_path(tmp_path / "out").exists()
    assert time.time() - t0 < 120


def test_evaluate_killed_mid_write_reruns_and_keeps_one_event_file(tmp_path):
    """A run killed after eval.md (eval.json not yet written) does not block the same evaluation; a rerun
    replaces tb/ whole (one event file), and a user's file in --out stays."""
    from dive_ds.build.outputs import PENDING_EVAL
    from dive_ds.cli import main
    from tests.fixtures.tiny import make_tiny_calibration

    model_dir, calib = make_tiny_calibration(tmp_path, n_domains=2)
    out = tmp_path / "ev"
    args = ["evaluate", str(model_dir), "--calib", str(calib), "--out", str(out)]
    assert main(args) == 0
    record = (out / "eval.json").read_text()
    (out / "mine.txt").write_text("the user's")
    assert main(args) == 0
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    # killed between eval.md and eval.json: the pending marker is still there
    (out / PENDING_EVAL).write_text(json.dumps({"identity": json.loads(record)["identity"]}))
    (out / "eval.json").unlink()
    assert main(args) == 0
    assert not (out / PENDING_EVAL).exists() and (out / "eval.json").is_file()
    assert (out / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "mine.txt", "tb"]
    # eval.md without a record or a pending marker of this evaluation: refused as before
    (out / "eval.json").unlink()
    assert main(args) == 2
