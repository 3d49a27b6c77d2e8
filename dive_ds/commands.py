"""Sub-commands beyond `calibrate` (mine, reconstruct, evaluate, export, demo)."""

from __future__ import annotations


def add_all(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded default")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a) -> int:
    from dive_ds.cli import main

    return main(["calibrate", "--demo"])
