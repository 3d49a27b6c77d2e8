"""slurm/dive_tiny.sh on a real 2-node SLURM cluster started on this machine
(tests/fixtures/slurm_cluster.py): the whole pipeline end to end, then a pre-empted copy that checkpoints,
requeues itself and ends with the same final loss. The daemons are stopped by their process ids at the end."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures import REPO
from tests.fixtures.slurm_cluster import LocalSlurm, ensure_packages

SCRIPT = REPO / "slurm" / "dive_tiny.sh"
pytestmark = pytest.mark.slurm


def missing_flags() -> str | None:
    """slurm/common.sh runs calibration and router fitting on every rank with issue 11's flags; a tree
    without them (the calibrate / fit-router work not merged yet) could only fail the job."""
    import argparse

    from dive_ds.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    want = {"calibrate": ("--device", "--dtype", "--checkpoint-dir", "--checkpoint-every", "--stop-file"),
            "fit-router": ("--device", "--dtype")}  # fmt: skip
    missing = [f"{cmd} {f}" for cmd, flags in want.items() for f in flags
               if f not in sub.choices[cmd]._option_string_actions]  # fmt: skip
    return (
        f"dive-ds lacks {', '.join(missing)} (issue 11's multi-rank passes), which slurm/common.sh passes"
        if missing
        else None
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_flags() or ensure_packages()
    if reason:
        pytest.skip(reason)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()
    for pid in c.pids():  # every daemon it started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def job_env(out: Path, **extra) -> dict:
    # The two "nodes" share this machine's cores: one thread per rank, as slurm/dive_tiny.sh defaults to
    # (a pytest run by hand may have OMP_NUM_THREADS=2 for its in-process tests, which sbatch would pass on; two ranks of
    # two threads each on two cores made this module's first job take 185 s in the suite, against 102 s)
    return {"REPO": str(REPO), "OUT": str(out), "MINE_FAST": "1", "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1"} | extra  # fmt: skip


def rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "retrain" / "metrics.jsonl").read_text().splitlines()]


def explain(log: str) -> str:
    """A failed job's story: the pipeline's own lines and every error line, then the log's tail."""
    keep = [ln for ln in log.splitlines() if ln.startswith("[dive") or "error" in ln.lower() or "USR1" in ln]
    return "\n".join(keep[-60:]) + "\n--- tail ---\n" + log[-2000:]


def final_losses(out: Path) -> tuple[float, float]:
    steps = [r for r in rows(out) if "event" not in r and r["stage"] == "experts"]
    final = json.loads((out / "retrain" / "stages" / "experts" / "summary.json").read_text())["final_eval"]
    return steps[-1]["loss"], final["loss"]


@pytest.fixture(scope="module")
def tiny_run(cluster, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    out = root / "out"
    t0 = time.monotonic()
    # this job mines the paper's way (the D x D pruned evaluations, streamed on both ranks); the pre-emption
    # job below keeps the fast affinity
    job = cluster.sbatch(
        SCRIPT, job_env(out, MINE_FAST=""), ["--chdir", str(root), "--output", str(root / "job-%j.out")]
    )
    state = cluster.wait(job, timeout=900)
    log = (root / f"job-{job}.out").read_text()
    return {"out": out, "state": state, "log": log, "seconds": time.monotonic() - t0}


def test_sbatch_dive_tiny_end_to_end(tiny_run):
    out, log = tiny_run["out"], tiny_run["log"]
    assert tiny_run["state"] == "COMPLETED", explain(log)
    assert "done:" in log
    # calibration, mining, router fitting and the final evaluation ran on every rank of the allocation: one
    # srun task per node, each starting its node's rank with torchrun (2 nodes x 1 rank)
    assert log.count("2 srun task(s) x torchrun 1 rank(s) of reconstruct.py") == 4, explain(log)
    assert "mining on 2 node(s) x 1 rank(s)" in log
    mining = json.loads((out / "mining" / "mining.json").read_text())
    assert (
        mining["affinity_used"] == "paper (pruned perplexity)"
        and (out / "mining" / "pruned_ppl.csv").is_file()
    ), mining
    assert json.loads((out / "calib" / "manifest.json").read_text())["pass"]["world_size"] == 2
    assert json.loads((out / "moe-fitted" / "router_fit.json").read_text())["ranks"] == 2
    # reconstruction ran once per node, and each node wrote only its own experts' shards
    layout = json.loads((out / "moe" / "dive_shards.json").read_text())
    assert layout["nodes"] == 2 and layout["ep_size"] == 2 and layout["num_experts"] == 2
    for node in (0, 1):
        rec = json.loads((out / "moe" / "nodes" / f"node-{node:05d}.json").read_text())
        assert rec["experts"] == [node]
        expert_files = [f for f in rec["files"] if f.startswith("experts/")]
        assert len(expert_files) == layout["num_layers"]
        assert all(f.endswith(f"expert-{node:03d}.safetensors") for f in expert_files)
        assert any(f.startswith("shared/") for f in rec["files"]) == (node == 0)
    # retraining: 2 ranks over the 2 nodes, expert parallel 2, ZeRO-3; the held-out loss fell
    start = [r for r in rows(out) if r.get("event") == "stage_start"]
    assert {(r["world_size"], r["zero_stage"]) for r in start} == {(2, 3)}
    evals = [r for r in rows(out) if r.get("event") == "eval"]
    before, after = evals[0], evals[-1]
    assert (before["stage"], before["step"]) == ("router", 0) and after["stage"] == "experts"
    assert after["loss"] < before["loss"] - 0.05, (before["loss"], after["loss"])
    # retraining wrote its output sharded by expert, each rank only the expert it holds
    for rank in (0, 1):
        rec = json.loads((out / "retrain" / "model" / "nodes" / f"node-{rank:05d}.json").read_text())
        assert rec["experts"] == [rank]
    # the consolidated model loads
    from transformers import AutoModelForCausalLM

    from dive_ds.models.moe import register

    register()
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert model.config.num_local_experts == 2
    ids = torch.arange(10, 74).view(1, 64)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # the job ends with the retrained model's perplexity on the calibration's held-out windows, on 2 ranks
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert (
        ev["ranks"] == 2 and ev["domains"] == ["wiki_evals", "code_stdlib"] and ev["evaluated"] == "streamed"
    )
    assert sorted(ev["router"]) == ["code_stdlib", "wiki_evals"] and all(
        map(math.isfinite, ev["router"].values())
    )
    print(f"dive_tiny.sh on 2 nodes: {tiny_run['seconds']:.0f} s")


def test_preempted_job_checkpoints_requeues_and_finishes_the_same(cluster, tiny_run, tmp_path):
    ref = tiny_run["out"]
    assert tiny_run["state"] == "COMPLETED"
    out = tmp_path / "out"
    # the reference's calibration, groups and fitted MoE: this job's subject is retraining's pre-emption
    env = job_env(
        out,
        CALIB=str(ref / "calib"),
        GROUPS_JSON=str(ref / "mining" / "groups.json"),
        MOE=str(ref / "moe-fitted"),
        EVALUATE="0",  # the first job tested the evaluation step
    )
    job = cluster.sbatch(SCRIPT, env, ["--chdir", str(tmp_path), "--output", str(tmp_path / "job-%j.out")])
    metrics = out / "retrain" / "metrics.jsonl"
    end = time.monotonic() + 600
    while time.monotonic() < end:  # signal once the experts stage has made 2 steps
        if metrics.is_file() and any(
            r.get("stage") == "experts" and r.get("step", 0) >= 2 and "event" not in r for r in rows(out)
        ):
            break
        assert cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), cluster.state(job)
        time.sleep(1)
    cluster.signal(job, "USR1")
    cluster.start_now_when_requeued(job, timeout=300)
    state = cluster.wait(job, timeout=900)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state == "COMPLETED", explain(log)
    assert "requeueing job" in log and "restart 1]" in log, explain(log)
    # graceful: the trainer stopped after a step and checkpointed that very step (not killed mid-way)
    stopped = re.findall(r"stage experts: stopped after step (\d+)", log)
    resumed = re.findall(r"\[experts\] resumed from \S+ at step (\d+)", log)
    assert len(set(stopped)) == 1 and resumed == stopped[:1], explain(log)
    assert f"USR1: asking the step to checkpoint and stop ({out}/retrain/STOP)" in log
    assert int(cluster.job_info(job).get("Restarts", "0")) == 1
    got, want = final_losses(out), final_losses(ref)
    assert got[0] == pytest.approx(want[0], abs=1e-5) and got[1] == pytest.approx(want[1], abs=1e-5), (
        got,
        want,
    )


# run_step + on_preempt of slurm/common.sh with a stand-in for the calibration pass: it checkpoints and
# exits 3 once the stop file appears (at its "layer boundary"); scontrol is a stub that records the requeue.
STOPPABLE = r"""
set -euo pipefail
source "$REPO/slurm/common.sh"
scontrol() { echo "scontrol $*" >> "$OUTDIR/calls.txt"; }
SLURM_JOB_ID=7
STOP_GRACE=20
trap on_preempt USR1
pass() {
    touch "$OUTDIR/running"
    while [[ ! -f "$1" ]]; do sleep 0.1; done
    echo "checkpointed" >> "$OUTDIR/calls.txt"
    exit 3
}
touch "$OUTDIR/calib.stop"  # a stale request from before a requeue: removed when the step starts
run_step "$OUTDIR/calib.stop" pass "$OUTDIR/calib.stop"
echo "not requeued" >> "$OUTDIR/calls.txt"
"""


def test_usr1_stops_a_stop_file_step_which_checkpoints_and_requeues(tmp_path):
    proc = subprocess.Popen(["bash", "-c", STOPPABLE], env=os.environ | {"REPO": str(REPO), "OUTDIR": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    end = time.monotonic() + 30
    while not (tmp_path / "running").exists():
        assert time.monotonic() < end and proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    assert not (tmp_path / "calib.stop").exists()  # the stale request did not stop the new step
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (tmp_path / "calls.txt").read_text().splitlines() == ["checkpointed", "scontrol requeue 7"], out
    assert f"USR1: asking the step to checkpoint and stop ({tmp_path}/calib.stop)" in out
    assert "the step ended (exit 3)" in out and "requeueing job 7" in out
