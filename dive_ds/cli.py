"""`dive-ds` command line: calibrate, mine, reconstruct, fit-router, compare, compare-report, consolidate,
evaluate, plan, export, demo, retrain. Each command is a module of dive_ds/commands/: its settings
dataclass gives the flags (dive_ds/flags.py), its `run` calls the step.

Every problem with the input is a one-line `dive-ds: error: ...` and exit status 2,
raised before any heavy work starts.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys

from dive_ds.argtypes import OneLineParser, error_message
from dive_ds.commands import COMMANDS
from dive_ds.flags import add_flags, from_namespace

WRITERS = (
    "calibrate",
    "mine",
    "reconstruct",
    "fit-router",
    "compare",
    "consolidate",
    "evaluate",
    "export",
    "demo",
)
"""Commands that write --out: one run per output at a time (dive_ds.io.atomic.OutputLock). `retrain`
locks its out_dir itself (dive_ds/train/retrain.py), once its run config is read."""


def command_module(name: str):
    """The module of command `name` (`fit-router` -> dive_ds.commands.fit_router)."""
    return importlib.import_module(f"dive_ds.commands.{name.replace('-', '_')}")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="dive-ds",
        description="DIVE dense-to-MoE reconstruction "
        "(domain affinity mining, pruning-based experts) and DeepSpeed retraining.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS:
        name = module_name.replace("_", "-")
        mod = command_module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION)
        add_flags(p, mod.Settings)
    return parser


def _output_lock(command: str, settings) -> contextlib.AbstractContextManager:
    """The --out lock of a writing command, held by the launch's first rank (one per node with --shards)."""
    out = getattr(settings, "out", None)
    if command not in WRITERS or not out or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    from dive_ds.io.atomic import OutputLock

    tag_of = getattr(command_module(command), "lock_tag", None)
    return OutputLock(out, f"dive-ds {command}", tag_of(settings) if tag_of else None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, printed by OneLineParser) returns 2; --help exits
        if e.code == 2:
            return 2
        raise
    command = ["dive-ds", *(sys.argv[1:] if argv is None else argv)]  # what the run records of its command
    mod = command_module(a.command)
    # OSError: a path that is missing, a file, unwritable; a command may name its own (retrain)
    one_line = getattr(mod, "ONE_LINE_ERRORS", (ValueError, RuntimeError, OSError))
    try:
        settings = from_namespace(mod.Settings, a)
        with _output_lock(a.command, settings):
            if "argv" in inspect.signature(mod.run).parameters:
                return mod.run(settings, command)
            return mod.run(settings)
    except one_line as e:
        print(f"dive-ds: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dive-ds: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
