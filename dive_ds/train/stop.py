"""Stopping a run cleanly: a signal or the stop file ends the stage after a checkpoint."""

from __future__ import annotations

import signal
import sys
from pathlib import Path


class Interrupted(Exception):
    """A SIGTERM/SIGINT arrived; a checkpoint was saved; relaunch to resume."""


STOP_FILE = "STOP"
"""`touch OUT_DIR/STOP`: every rank finishes its step, the stage checkpoints and the launcher exits 143,
as on SIGTERM. The SLURM scripts use it on pre-emption (a signal to the step would reach torchrun
too, which gives its workers only 30 s). A relaunch refuses to start while the file is there."""


class StopFlag:
    """SIGTERM/SIGINT, or the stop file appearing, asks for a checkpoint and a clean exit."""

    def __init__(self, stop_file: Path | None = None):
        self._signalled = False
        self._file = stop_file
        self._old = {}

    @property
    def set(self) -> bool:
        return self._signalled or (self._file is not None and self._file.exists())

    def install(self) -> None:
        if sys.platform == "win32" or not _main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
