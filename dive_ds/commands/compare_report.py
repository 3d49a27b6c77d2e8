"""`dive-ds compare-report`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dive_ds.flags import flag

HELP = "the comparison tables from a compare.json, printed or written into the README"
DESCRIPTION = (
    "Regenerates compare.md's tables from compare.json; with --readme, replaces the block between "
    "<!-- compare:begin --> and <!-- compare:end --> of that file."
)


@dataclass
class Settings:
    json: str = flag(None, "compare.json of a `dive-ds compare` run", required=True)
    readme: str | None = flag(None, "a Markdown file with the compare markers to update")


def run(s: Settings) -> int:
    from dive_ds.build.compare_report import markdown, update_readme

    path = Path(s.json)
    if not path.is_file():
        raise ValueError(f"--json {path} does not exist; pass the compare.json of a `dive-ds compare` run")
    results = json.loads(path.read_text())
    if "ratio_summary" not in results:
        raise ValueError(f"{path} is from an older compare (no ratio_summary); rerun `dive-ds compare`")
    if s.readme:
        update_readme(Path(s.readme), results, str(path))
        print(f"updated the comparison block of {s.readme} from {path}")
    else:
        print(markdown(results))
    return 0
