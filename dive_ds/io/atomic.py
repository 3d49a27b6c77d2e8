"""Every output is complete or absent, has one writer, and replaces nothing by deleting it.

- Files: `staged_file(path)` yields a hidden temp name beside `path` and renames it in only when the
  block ends without an error (`write_text`, `write_json`, `save_tensors`, `copy_file` use it).
- Folders: `staged_dir(out)` yields a hidden temp folder beside `out`; `publish(tmp, out)` renames it
  in. An `out` that already holds something (an earlier output, a file a user put there) is not
  deleted: it is moved whole into `out/superseded-<time>/`, as the trainer has always done.
- One writer: `OutputLock(out)` holds an `fcntl.flock` on `<out>.lock` (the file names the holder's pid and
  host). A second run on the same output is refused in one line naming the first run's pid; the kernel
  drops a dead run's lock, and the next run takes the file over and says so.
- A full disk ends in one line (which output, how much it needed where known, how much was free),
  never in a traceback, and leaves nothing under the output's name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


class DiskFull(OSError):
    """The disk ran out (or would run out) while writing an output: one line, no traceback."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(out: Path, need: int, what: str = "output") -> None:
    """Refuse, before any work, an output of about `need` bytes that the disk under `out` cannot hold."""
    free = free_bytes(Path(out).parent)
    if need > free:
        raise DiskFull(
            f"{what} {out} needs about {_gb(need)} and only {_gb(free)} is free there; "
            "free some space or choose an --out on another disk",
        )


def _is_disk_full(e: BaseException) -> bool:
    """A full disk not yet reported as DiskFull."""
    if isinstance(e, DiskFull):
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors reports a full disk as its own error type, with the OS message inside
    return type(e).__name__ == "SafetensorError" and "No space left" in str(e)


def _disk_full(path: Path, need: int | None = None) -> DiskFull:
    free = free_bytes(path.parent)
    needed = f" (about {_gb(need)} needed)" if need else ""
    return DiskFull(
        f"the disk filled up while writing {path}{needed}, {_gb(free)} free now; nothing was left under "
        "that name: free some space or choose an --out on another disk",
    )


def temp_name(path: Path) -> Path:
    """A hidden name beside `path`, unique per process and call (concurrent writers never share one)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it to `path` when the block ends cleanly, remove it if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise _disk_full(path) from e
        raise


def write_text(path: Path | str, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def copy_file(src: Path | str, path: Path | str) -> None:
    with staged_file(path) as tmp:
        shutil.copy2(src, tmp)


def save_tensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file under its final name only when complete."""
    from safetensors.torch import save_file

    with staged_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata or {"format": "pt"})


@contextlib.contextmanager
def staged_dir(out: Path | str) -> Iterator[Path]:
    """Yield a hidden temp folder beside `out` and `publish` it there when the block ends cleanly; on an
    error (or Ctrl-C) the temp folder goes and `out` is as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise _disk_full(out) from e
        raise


def superseded_name(parent: Path) -> Path:
    """A new `superseded-<time>[-n]` path inside `parent`."""
    stamp = time.strftime("superseded-%Y%m%d-%H%M%S")
    dest, n = parent / stamp, 1
    while dest.exists():
        dest, n = parent / f"{stamp}-{n}", n + 1
    return dest


def move_aside(path: Path) -> Path:
    """Move `path` (a file or folder this program wrote earlier) into a new `superseded-<time>/` beside it
    -> its new path. The replacement for deleting an earlier output."""
    dest = superseded_name(path.parent)
    dest.mkdir()
    os.replace(path, dest / path.name)
    return dest / path.name


def publish(tmp: Path, out: Path) -> Path | None:
    """Rename the finished folder `tmp` to `out`. An empty `out` is removed; anything else already at
    `out` is moved whole into `out/superseded-<time>/` (returned), never deleted. Every step is a rename
    on one file system: killed in between, the old output sits at a hidden `.<name>.old-<pid>` beside."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return None
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:  # interrupted between the two renames: put the old output back
        os.replace(old, out)
        raise
    dest = superseded_name(out)
    os.replace(old, dest)
    print(f"the earlier contents of {out} were moved to {dest}", file=sys.stderr)
    return dest


# --------------------------------------------------------------------------- one writer per output


class OutputBusy(ValueError):
    """Another live run holds the output's lock (a refusal, like every bad-input error)."""


def lock_path(out: Path | str, tag: str | None = None) -> Path:
    """`<out>.lock` beside `out` (`<out>.<tag>.lock`: e.g. one lock per node of a sharded folder)."""
    out = Path(out)
    return out.parent / f"{out.name}{'.' + tag if tag else ''}.lock"


class OutputLock:
    """`with OutputLock(out):` one writer for `out` at a time (see the module docstring).

    The lock is an `fcntl.flock` on `<out>.lock`, which the kernel drops when its process dies, however it
    dies (SIGKILL, a requeued SLURM job on another node, a container restart), so a dead run never blocks a
    new one; the file holds the holder's pid and host for the refusal's message. A file left by a dead run
    is taken over, and the run says so."""

    def __init__(self, out: Path | str, command: str = "dive-ds", tag: str | None = None):
        self.out = Path(out)
        self.path = lock_path(self.out, tag)
        self.command = command
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            rec = json.loads(os.read(fd, 4096).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def acquire(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = self._read(fd)
                os.close(fd)
                pid, host = rec.get("pid", "?"), rec.get("host")
                who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
                raise OutputBusy(
                    f"{self.out} is being written by another run ({who}, {rec.get('command', '?')}, since "
                    f"{rec.get('started', '?')}); wait for it to end"
                ) from None
            try:  # the file may have been released and removed between our open and our lock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._read(fd)
            if old.get("pid") is not None:  # its holder died without releasing it (the kernel did)
                print(
                    f"took over the lock on {self.out}: its run (pid {old['pid']}) is gone", file=sys.stderr
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (self._record() + "\n").encode())
            self.fd = fd
            return self
        raise OutputBusy(f"could not lock {self.out} ({self.path} keeps changing); is another run starting?")

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.path.unlink()  # while still locked: a waiting run then makes a fresh file
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of `src` at `dst` (an unchanged file shared with the input), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
