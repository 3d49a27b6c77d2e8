"""Command-line flags derived from config dataclasses: one source for a setting's name, default and help.

A field made with `flag(...)` is a flag: `--field-name` (or `name=`), its default the field's default,
its type, choices and help in the metadata. A field made with `nested(...)` holds a dataclass whose
flags are added in its place (their dests are dotted, `fit.l2`); any other field is not a flag.
`add_flags` puts a dataclass's flags on a parser; `from_namespace` builds the dataclass back from the
parsed namespace. Nothing here imports more than the standard library, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_KEYS = ("help", "type", "choices", "metavar", "nargs", "required", "action", "name", "positional", "group")


def flag(default: Any = None, help: str = "", **kw) -> Any:
    """A dataclass field that is a command-line flag (kw: type, choices, metavar, nargs, required,
    action, name (the flag, default --field-name), positional, group (an argument group's title))."""
    bad = set(kw) - set(_KEYS)
    if bad:
        raise TypeError(f"flag(): unknown option(s) {sorted(bad)}")
    action = kw.get("action")
    if action == "store_true" and default is not False or action == "store_false" and default is not True:
        raise TypeError(f"flag(): action {action} needs the default {action != 'store_true'}")
    if default is True and action is None and "type" not in kw:
        raise TypeError("flag(): a bool defaulting to True needs action='store_false' and a --no-... name")
    if action == "append" and default != []:
        raise TypeError("flag(): an append flag starts from [] (argparse would append to the default)")
    meta = {"flag": True, "help": help, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls: type, group: str | None = None) -> Any:
    """A dataclass field holding `cls`, whose flags are added in its place (in `group` if given)."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls, "group": group})


def add_flags(parser, cls: type, prefix: str = "", group=None) -> None:
    """Add the flags of dataclass `cls` to `parser`, in field order."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "nested" in m:
            sub = group
            if m.get("group"):
                sub = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
            add_flags(parser, m["nested"], f"{prefix}{f.name}.", sub)
            continue
        if not m.get("flag"):
            continue
        target = group or parser
        if m.get("group"):
            target = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        kw: dict[str, Any] = {"help": m["help"]}
        for key in ("type", "choices", "metavar", "nargs", "action"):
            if m.get(key) is not None:
                kw[key] = m[key]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if "action" not in kw and default is False and "type" not in kw:
            kw["action"] = "store_true"
        elif kw.get("action") not in ("store_true", "store_false"):
            kw["default"] = default
        if m.get("positional"):
            if prefix:
                raise TypeError(
                    f"flag(): positional {f.name} inside a nested dataclass (top-level fields only)"
                )
            target.add_argument(f.name, **kw)
            continue
        if m.get("required"):
            kw["required"] = True
        name = m.get("name") or "--" + f.name.replace("_", "-")
        names = [name] if isinstance(name, str) else list(name)
        if "metavar" not in kw and "choices" not in kw and kw.get("action") is None and prefix:  # not FIT.L2
            kw["metavar"] = names[0].lstrip("-").replace("-", "_").upper()
        target.add_argument(*names, dest=prefix + f.name, **kw)


def from_namespace(cls: type, ns, prefix: str = ""):
    """The dataclass `cls` from a namespace that `add_flags(parser, cls)` parsed (its __post_init__ checks run)."""
    values = {}
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            values[f.name] = from_namespace(f.metadata["nested"], ns, f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            value = getattr(ns, prefix + f.name)
            values[f.name] = (
                list(value) if isinstance(value, list) else value
            )  # no list shared between parses
    return cls(**values)
