"""Fault injection for tests: make every rank die like a killed process at a chosen point."""

from __future__ import annotations

import os

CRASH_ENV = "DIVE_DS_TEST_CRASH_AFTER_STEP"
"""Test hook: `N` or `STAGE:N` makes every rank exit abruptly (os._exit) right after step N;
`STAGE:N:save` does it inside step N's checkpoint save, after the files and before the commit."""


def _crash_spec() -> tuple[str | None, int, str] | None:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    parts = value.split(":")
    if len(parts) == 1:
        return None, int(parts[0]), "step"
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "step"


def crash_step(stage: str) -> int | None:
    spec = _crash_spec()
    if spec is None or spec[2] != "step" or spec[0] not in (None, stage):
        return None
    return spec[1]


def crash_point(stage: str, step: int, where: str) -> None:
    spec = _crash_spec()
    if spec is not None and spec[0] in (None, stage) and spec[1] == step and spec[2] == where:
        os._exit(3)  # test hook: die like a killed process, no clean-up
