"""Range-checked argparse types and a parser whose errors are one line.

Every numeric flag of `dive-ds` and the launchers is checked when the command line is parsed, before
anything is read or computed: `--seq-len 0` or `--batch-size -3` is `dive-ds: error: argument
--seq-len: 0: use an integer >= 2` with exit status 2, never a silent default or a crash after the pass.
"""

from __future__ import annotations

import argparse
import math
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`<prog>: error: ...`) naming the fix, exit status 2."""

    def error(self, message: str):
        top = self.prog.split()[0]
        cmd = " ".join(self.prog.split()[:2])
        print(f"{top}: error: {message} (see `{cmd} --help`)", file=sys.stderr)
        sys.exit(2)


def int_at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: use an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: use a finite number")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g}: use a number > 0")
    return value


def nonneg_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g}: use a number >= 0")
    return value


def ratio(text: str) -> float:
    """A fraction of channels dropped: 0 <= r < 1."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value:g}: use a ratio 0 <= r < 1")
    return value


def error_message(e: BaseException) -> str:
    """The first line of an error, for `dive-ds: error: ...` (an OSError: the path and what went wrong)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        hint = {
            "FileNotFoundError": "check the path",
            "NotADirectoryError": "a folder was expected; choose another path",
            "IsADirectoryError": "a file was expected; choose another path",
            "FileExistsError": "choose another path",
            "PermissionError": "check its permissions",
        }.get(type(e).__name__, "check the path and the disk")
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return f"{where}: {e.strerror}; {hint}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
