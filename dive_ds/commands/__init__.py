"""One module per `dive-ds` command: its name, help, settings dataclass (the single source of its flags,
defaults and help; dive_ds/flags.py derives the parser from it) and `run(settings) -> exit status`.
These modules import only the standard library and dive_ds's light modules at the top; `run` imports
the step it calls (dive_ds/build/, dive_ds/train/, ...), so `--help` never loads torch."""

COMMANDS = (
    "calibrate",
    "mine",
    "reconstruct",
    "fit_router",
    "compare",
    "compare_report",
    "consolidate",
    "evaluate",
    "plan",
    "export",
    "demo",
    "retrain",
)
"""The command modules, in the order `dive-ds --help` lists them (the command is the name with - for _)."""
