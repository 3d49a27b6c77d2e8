"""`dive-ds retrain` and launchers/retrain.py are one code path (dive_ds/commands/retrain.py): the same
flags, and the same one-line refusals, only the program name in front differs."""

import importlib.util

import pytest

from dive_ds.cli import build_parser, main
from tests.fixtures import REPO


def _launcher():
    spec = importlib.util.spec_from_file_location("retrain_launcher", REPO / "launchers" / "retrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_the_command_and_the_launcher_take_the_same_flags():
    sub = build_parser()._subparsers._group_actions[0].choices["retrain"]
    assert _options(sub) == _options(_launcher().build_parser())
    assert {"--deepspeed", "--config", "--set", "--consolidate", "--local_rank", "--local-rank"} <= _options(
        sub
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--consolidate", "CKPT"], "--consolidate needs --out DIR"),
        (["--deepspeed", "ds_configs/zero2.json"], "pass --deepspeed CONFIG.json and --config RUN.yaml"),
    ],
)
def test_the_same_bad_input_is_refused_in_the_same_line(argv, message, capsys):
    assert main(["retrain", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"dive-ds: error: {message}"
    assert _launcher().main(argv) == 2
    assert capsys.readouterr().err.strip() == f"retrain: error: {message}"
