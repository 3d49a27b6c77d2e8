"""Kill a long step at each of its writes, relaunch: the same bytes as an uninterrupted run, and never a
half-written output under the final name.

The kill is real (os._exit in a forked child: no clean-up, no `finally`), placed at every call of the
function that writes the step's files, so every point between two writes is covered, the last one
(just before the output is committed by a rename) included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import dive_ds  # noqa: F401  (registers dive_moe)
from dive_ds.cli import main
from tests.fixtures.procs import killed_at
from tests.fixtures.tiny import make_tiny_calibration


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model_dir, calib_dir = make_tiny_calibration(root)
    moe = root / "moe"
    assert main(["reconstruct", "--calib", str(calib_dir), "--method", "random-split", "--experts", "2",
                 "--no-bias-compensation", "--out", str(moe)]) == 0  # fmt: skip
    return {"calib": calib_dir, "moe": moe}


STEPS = [  # (command, the function that writes its files, the files compared (None: all), kill points)
    ("reconstruct --calib {calib} --method random-split --experts 2 --out {out}",
     "dive_ds.build.moe_writer:save_file", None, 20),
    ("fit-router --moe {moe} --calib {calib} --max-iter 5 --no-progress --out {out}",
     "dive_ds.build.fit_router:save_file", ".safetensors", 1),  # router_fit.json records timings; 1 of 3 (time)
    ("export {moe} --out {out}", "transformers.modeling_utils:safe_save_file", None, 20),
]  # fmt: skip


@pytest.mark.skipif(
    not hasattr(os, "fork"),
    reason="needs os.fork (POSIX): the kill must skip all clean-up, which only a forked child allows",
)
@pytest.mark.parametrize("argv,target,compared,points", STEPS)
def test_killed_at_every_write_then_relaunched(tiny, tmp_path, argv, target, compared, points):
    def command(out: Path) -> list[str]:
        return argv.format(out=out, **tiny).split()

    reference = tmp_path / "reference"
    assert main(command(reference)) == 0
    expected = {k: v for k, v in _files(reference).items() if compared is None or k.endswith(compared)}
    killed = 0
    for call in range(1, points + 1):
        out = tmp_path / f"run{call}"
        status = killed_at(call, target, command(out))
        if status == 0:  # no call-th write: every point has been covered
            break
        assert status == 9, f"{argv}: kill at write {call} gave exit {status}"
        killed += 1
        assert not out.exists(), f"{argv}: a kill at write {call} left {out} under its final name"
        assert main(command(out)) == 0  # relaunch
        got = {k: v for k, v in _files(out).items() if compared is None or k.endswith(compared)}
        assert got == expected, f"{argv}: relaunch after a kill at write {call} differs"
    assert killed >= 1  # the hook really fired
