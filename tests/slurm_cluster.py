"""A real SLURM cluster on this one machine, for tests: munged, slurmctld and two slurmd "nodes".

Debian's slurm-wlm and munge are installed with apt when missing (`ensure_packages`); every daemon
runs in the foreground under its own Popen, so `stop()` kills exactly the processes it started.
Node names n1, n2 resolve to 127.0.0.1 through NodeAddr (they are not DNS names).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def ensure_packages() -> str | None:
    """Install slurm-wlm and munge with apt when missing -> None, or the reason they cannot be had."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("sbatch"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (
            "slurm-wlm/munge are not installed and this is not a root Debian machine (apt-get as root needed)"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalSlurm:
    """munged + slurmctld + slurmd n1, n2 under `root`; use `env` for every SLURM command."""

    def __init__(self, root: Path, cpus: int = 1):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = os.environ | {"SLURM_CONF": str(self.root / "slurm.conf")}

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 60) -> None:
        r = self.root
        for d in ("state", "spool/n1", "spool/n2", "munge", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={key}", "bs=1024", "count=1"], check=True, capture_output=True
        )
        os.chmod(key, 0o400)
        socket_path = r / "munge" / "munge.socket"
        self.env["MUNGE_SOCKET"] = str(socket_path)  # not read by slurm; slurm.conf names it (AuthInfo)
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
             f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
             f"--log-file={r / 'log' / 'munged.log'}"],
        )  # fmt: skip
        self._wait_for(socket_path.exists, timeout, "munged socket")
        ctld, n1, n2, s_lo = _free_ports(4)
        host = socket.gethostname()
        conf = f"""
ClusterName=divetest
SlurmctldHost={host}
SlurmctldPort={ctld}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}/%n
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
SrunPortRange={s_lo}-{s_lo + 50}
KillWait=60
InactiveLimit=0
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs={self.cpus} State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        (r / "slurm.conf").write_text(conf.lstrip())
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(r / "slurm.conf")])
        self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld")
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(r / "slurm.conf")])
        self._wait_for(self._nodes_idle, timeout, "both slurmd nodes idle")

    def stop(self) -> None:
        for name in ("slurmd-n2", "slurmd-n1", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: Path, env: dict, args: list[str] = ()) -> int:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args, str(script)], env=self.env | env, capture_output=True, text=True
        )
        if proc.returncode:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True, text=True
        )
        info = {}
        for field in proc.stdout.split():
            if "=" in field:
                k, v = field.split("=", 1)
                info[k] = v
        return info

    def state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(
        self, job_id: int, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    ) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = self.state(job_id)
            if state in done:
                return state
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout:.0f} s")

    def start_now_when_requeued(self, job_id: int, timeout: float) -> None:
        """Once the job is back in the queue after a requeue, let it start now (SLURM otherwise holds a
        requeued job for a couple of minutes: BeginTime)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job_info(job_id)
            if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING":
                # started at once, the relaunch can reach slurmd while it still counts the job's previous
                # run as killed: "Job N already killed, do not launch batch job", and the job ends FAILED
                # (seen once: launched 0.7 s after the kill, in the same second). SLURM's own BeginTime
                # hold avoids that; a 2 s wait is ours.
                time.sleep(2.0)
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env, check=True
                )
                return
            if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in ("RUNNING", "COMPLETED"):
                return
            time.sleep(1)
        raise TimeoutError(f"job {job_id} was not requeued within {timeout:.0f} s")

    def signal(self, job_id: int, sig: str = "USR1", batch_only: bool = True) -> None:
        """`scancel --signal`: to the batch shell only (as `--signal=B:...` does), or to every step."""
        batch = ["--batch"] if batch_only else []
        subprocess.run(["scancel", f"--signal={sig}", *batch, str(job_id)], env=self.env, check=True)

    # ------------------------------------------------------------------ helpers
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - lives as long as the daemon
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _ok(self, cmd: list[str], needle: str) -> bool:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        return proc.returncode == 0 and needle in proc.stdout

    def _nodes_idle(self) -> bool:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
        )
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def _wait_for(self, check, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited (see {self.root / 'log'}) while waiting for {what}")
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.root / 'log'})"
        )
