"""dive_ds/flags.py: a settings dataclass -> argparse flags -> the dataclass back."""

from dataclasses import dataclass

import pytest

from dive_ds.argtypes import OneLineParser, positive_int
from dive_ds.flags import add_flags, flag, from_namespace, nested


@dataclass
class Inner:
    l2: float = flag(1e-4, "penalty", type=float)
    progress: bool = flag(True, "no bar", name="--no-progress", action="store_false")


@dataclass
class Outer:
    model: str = flag(None, "a folder", positional=True)
    steps: int = flag(3, "steps", type=positive_int)
    only: list[str] | None = flag(None, "domains", nargs="+")
    overrides: list[str] = flag([], "repeatable", name="--set", action="append")
    fast: bool = flag(False, "fast")
    fit: Inner = nested(Inner, "fit")
    note: str = "not a flag"


def parse(argv):
    p = OneLineParser(prog="t")
    add_flags(p, Outer)
    return from_namespace(Outer, p.parse_args(argv)), p


def test_defaults_types_and_nested_fields_round_trip():
    s, p = parse(["m"])
    assert s == Outer(model="m")  # every default as the dataclass says
    s, _ = parse(["m", "--steps", "7", "--only", "a", "b", "--set", "x=1", "--set", "y=2", "--fast",
                  "--l2", "0.5", "--no-progress"])  # fmt: skip
    assert (s.steps, s.only, s.overrides, s.fast) == (7, ["a", "b"], ["x=1", "y=2"], True)
    assert s.fit == Inner(l2=0.5, progress=False)
    assert {a.dest for a in p._actions} >= {"fit.l2", "fit.progress", "overrides"}
    assert "FIT.L2" not in p.format_help() and "--l2 L2" in p.format_help()  # the metavar of a nested flag


def test_one_parse_does_not_leak_into_the_next():
    p = OneLineParser(prog="t")
    add_flags(p, Outer)
    first = from_namespace(Outer, p.parse_args(["m", "--set", "a=1"]))
    second = from_namespace(Outer, p.parse_args(["m"]))
    first.overrides.append("b=2")
    assert second.overrides == [] and from_namespace(Outer, p.parse_args(["m"])).overrides == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: flag(True, "x", action="store_true"),
        lambda: flag(False, "x", action="store_false"),
        lambda: flag(True, "x"),  # would be a flag taking the string "False"
        lambda: flag(["a"], "x", action="append"),
        lambda: flag(1, "x", colour="red"),
    ],
)
def test_inconsistent_flags_are_refused_when_declared(make):
    with pytest.raises(TypeError):
        make()


def test_a_positional_inside_a_nested_dataclass_is_refused():
    @dataclass
    class Bad:
        x: str = flag(None, "x", positional=True)

    @dataclass
    class Holder:
        bad: Bad = nested(Bad)

    with pytest.raises(TypeError, match="positional x inside a nested"):
        add_flags(OneLineParser(prog="t"), Holder)
