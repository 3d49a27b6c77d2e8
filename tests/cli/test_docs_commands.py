"""Every command the README and docs/ show parses with the real parser (`dive-ds ...`, the launchers, also
under torchrun or srun), so a renamed or removed flag breaks the build, not a reader's run."""

import contextlib
import importlib.util
import io
import re
import shlex

import pytest

from dive_ds.cli import build_parser
from tests.fixtures import REPO

FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _retrain_parser():
    spec = importlib.util.spec_from_file_location("retrain_launcher", REPO / "launchers" / "retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def shown_commands() -> list[tuple[str, str]]:
    """(file:line, command line) of every shell line in a ```bash block, and of every `$ ` prompt line in any
    other fenced block (a recorded session), continuation lines joined."""
    out = []
    for path in FILES:
        text = path.read_text()
        for block in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
            start = text[: block.start()].count("\n") + 2
            lines = block.group(2).splitlines()
            if block.group(1) != "bash":  # a recorded session: its `$ ` lines and their continuations
                keep, cont = [], False
                for line in lines:
                    if line.startswith("$ ") or cont:
                        keep.append(line.removeprefix("$ "))
                        cont = line.endswith("\\")
                    else:
                        keep.append("")
                lines = keep
            joined, first = "", None
            for i, line in enumerate(lines):
                first = first if joined else start + i
                joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
                if not line.endswith("\\"):
                    out.append((f"{path.name}:{first}", joined))
                    joined = ""
    return out


def _command_args(line: str) -> tuple[str, list[str]] | None:
    """('dive-ds' | 'retrain', argv) of a line that runs one of the project's entries, else None."""
    words = shlex.split(line, comments=True)
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=.*", w)]  # leading VAR=value
    for i, w in enumerate(words):
        if w in ("dive-ds", "launchers/reconstruct.py") or (w == "dive_ds.cli" and words[i - 1] == "-m"):
            return "dive-ds", words[i + 1 :]
        if w.endswith("launchers/retrain.py"):
            return "retrain", words[i + 1 :]
    return None


CASES = [(where, line) for where, line in shown_commands() if _command_args(line)]


def test_the_docs_show_commands_of_every_entry():
    kinds = {_command_args(line)[0] for _, line in CASES}
    assert kinds == {"dive-ds", "retrain"} and len(CASES) >= 20


@pytest.mark.parametrize("where, line", CASES, ids=[w for w, _ in CASES])
def test_a_shown_command_parses(where, line):
    kind, argv = _command_args(line)
    parser = build_parser() if kind == "dive-ds" else _retrain_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{line.strip()}` does not parse (exit {e.code})")
    helped = [argv[0], "--help"] if kind == "dive-ds" else ["--help"]  # and its --help answers
    with contextlib.redirect_stdout(io.StringIO()) as shown, pytest.raises(SystemExit) as e:
        parser.parse_args(helped)
    assert e.value.code == 0 and "usage:" in shown.getvalue()
