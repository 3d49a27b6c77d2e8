"""The local SLURM cluster itself (tests/fixtures/slurm_cluster.py): two nodes that each run one task of a
2-node job, and the pre-emption mechanics slurm/*.sh rely on (a USR1 to the batch shell, whose trap
requeues the job; the job keeps its id and its second run sees SLURM_RESTART_COUNT=1). When the
fixture stops the cluster, no process it started is left."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.fixtures.slurm_cluster import LocalSlurm, ensure_packages

pytestmark = pytest.mark.slurm

TIMES: dict[str, float] = {}

PLACEMENT = """#!/bin/bash
#SBATCH --job-name=placement
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
set -euo pipefail
# shellcheck disable=SC2016
srun bash -c 'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_NODEID" > "$OUTDIR/task-$SLURM_PROCID.txt"'
"""

# The pattern of slurm/common.sh: the payload runs in the background so the USR1 trap runs during `wait`;
# the trap stops the payload, requeues the job (same id) and the first run ends; the second run finishes.
# The trap must stop the payload itself: with proctrack/linuxproc a child orphaned by the exiting shell
# escapes SLURM's clean-up (the teardown check below caught a `sleep` left running that way).
REQUEUE = """#!/bin/bash
#SBATCH --job-name=requeue
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=10
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
run="${SLURM_RESTART_COUNT:-0}"
echo "start $run $SLURM_JOB_ID" >> "$OUTDIR/runs.txt"
payload=""
on_usr1() {
    echo "usr1 $run" >> "$OUTDIR/runs.txt"
    if [[ -n "$payload" ]]; then kill -TERM "$payload"; wait "$payload" || true; fi
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap on_usr1 USR1
if [[ "$run" == 0 ]]; then
    sleep 600 &
    payload=$!
    touch "$OUTDIR/waiting"
    wait "$payload"
    echo "not signalled" >> "$OUTDIR/runs.txt"
    exit 1
fi
echo "done $run" >> "$OUTDIR/runs.txt"
"""


def processes_with_env(needle: str) -> list[int]:
    """Process ids whose environment holds `needle` (the daemons and their slurmstepd children)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle.encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    t0 = time.monotonic()
    reason = ensure_packages()
    if reason:
        pytest.skip(reason)
    TIMES["ensure_packages"] = time.monotonic() - t0
    c = LocalSlurm(tmp_path_factory.mktemp("cluster"))
    t0 = time.monotonic()
    c.start()
    TIMES["start"] = time.monotonic() - t0
    yield c
    pids, marker = c.pids(), f"SLURM_CONF={c.root / 'slurm.conf'}"
    t0 = time.monotonic()
    c.stop()
    TIMES["stop"] = time.monotonic() - t0
    print("\nlocal SLURM cluster, seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
    for pid in pids:  # every daemon it started is gone (reaped by stop())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert processes_with_env(marker) == [], "processes of the test cluster still running"


def test_two_nodes_run_one_task_each(cluster, tmp_path):
    script = tmp_path / "placement.sh"
    script.write_text(PLACEMENT)
    t0 = time.monotonic()
    job = cluster.sbatch(script, {"OUTDIR": str(tmp_path)}, ["--chdir", str(tmp_path), "--output", "%j.out"])
    state = cluster.wait(job, timeout=120)
    TIMES["placement job"] = time.monotonic() - t0
    assert state == "COMPLETED", (tmp_path / f"{job}.out").read_text()
    tasks = sorted(tuple(p.read_text().split()) for p in tmp_path.glob("task-*.txt"))
    assert tasks == [("0", "n1", "0"), ("1", "n2", "1")]
    assert cluster.job_info(job)["NodeList"] == "n[1-2]"


def test_usr1_trap_requeues_and_second_run_finishes(cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE)
    t0 = time.monotonic()
    job = cluster.sbatch(script, {"OUTDIR": str(tmp_path)}, ["--chdir", str(tmp_path), "--output", "%j.out"])
    end = time.monotonic() + 120
    while not (tmp_path / "waiting").exists():  # the first run is inside its `wait`
        assert time.monotonic() < end, f"job {job} did not start: {cluster.state(job)}"
        time.sleep(0.5)
    cluster.signal(job, "USR1", batch_only=True)
    cluster.start_now_when_requeued(job, timeout=120)  # else SLURM holds a requeued job ~2 minutes
    state = cluster.wait(job, timeout=120)
    TIMES["requeue job"] = time.monotonic() - t0
    runs = (tmp_path / "runs.txt").read_text().splitlines()
    assert state == "COMPLETED", runs
    assert runs == [f"start 0 {job}", "usr1 0", f"start 1 {job}", "done 1"]  # same job id, restart count 1
    assert cluster.job_info(job)["Restarts"] == "1"
