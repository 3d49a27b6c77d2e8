"""Domain registry: which text each calibration / evaluation / training domain comes from.

A registry is a JSON or YAML file:

    version: 1
    domains:
      wiki:                                  # domain name
        family: encyclopedic                 # optional source family (mining reports recovery)
        source: {type: local, files: ["wiki/*.jsonl"], text_field: text}
      c4:
        source: {type: hub, id: allenai/c4, config: en, split: validation, text_field: text}
      drama:
        source: {type: demo, name: drama_tragedies}   # a built-in demo-pack domain

Relative `files` resolve against the registry file's folder. Local formats: .txt (one
document per file), .jsonl/.json, .parquet. All loading goes through `datasets`.

Where a registry file is asked for, `demo` names the built-in demo pack's registry and
`demo-unseen` its unseen pack's (legal and religious text: families the demo pack lacks).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dive_ds.io.mapping import DuplicateKey, parse_mapping_text

_TOP_KEYS = {"version", "domains"}
_DOMAIN_KEYS = {"family", "source", "weight"}
_SOURCE_KEYS = {
    "local": {"type", "files", "text_field"},
    "hub": {"type", "id", "config", "split", "text_field", "revision"},
    "demo": {"type", "name"},
}


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's documents come from (one of the three source types)."""

    type: str
    files: tuple[str, ...] = ()
    """local: resolved file paths (globs expanded)."""
    text_field: str = "text"
    """local jsonl/parquet and hub: the column that holds the document text."""
    id: str = ""
    """hub: dataset id."""
    config: str | None = None
    """hub: dataset configuration name."""
    split: str = "train"
    """hub: split to read."""
    revision: str | None = None
    """hub: dataset revision."""
    name: str = ""
    """demo: built-in demo-pack domain."""


@dataclass(frozen=True)
class Domain:
    name: str
    source: DomainSource
    family: str | None = None
    """Source family (e.g. `math`); mining reports how well its groups recover families."""
    weight: float = 1.0
    """Sampling weight in a training mixture."""


@dataclass(frozen=True)
class Registry:
    path: Path
    domains: dict[str, Domain] = field(default_factory=dict)

    def select(self, names: list[str] | None) -> list[Domain]:
        if not names:
            return list(self.domains.values())
        unknown = [n for n in names if n not in self.domains]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown} in {self.path}; known: {sorted(self.domains)}")
        return [self.domains[n] for n in names]

    @property
    def families(self) -> dict[str, str | None]:
        return {n: d.family for n, d in self.domains.items()}


def _fail(path: Path, msg: str) -> None:
    raise ValueError(f"registry {path}: {msg}")


def load_registry(path: str | Path) -> Registry:
    """Parse and validate a registry file; every problem is a one-line ValueError."""
    path = Path(path)
    if path.name == "demo" and not path.exists():
        from dive_ds.data.demo_pack import demo_registry_path

        path = demo_registry_path()
    elif path.name == "demo-unseen" and not path.exists():
        from dive_ds.data.demo_pack import unseen_registry_path

        path = unseen_registry_path()
    if not path.exists():
        raise ValueError(f"registry file {path} does not exist; pass --domains FILE (JSON or YAML) or --demo")
    text = path.read_text()
    if not text.strip():
        _fail(path, "file is empty; list at least one domain under `domains:`")
    try:
        raw = parse_mapping_text(text, path.suffix == ".json")
    except DuplicateKey as e:
        raise ValueError(f"{path}: {e}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"registry {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {e}".splitlines()[0]
        ) from e
    if not isinstance(raw, dict):
        _fail(path, "top level must be a mapping with `domains:`")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        _fail(path, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    doms = raw.get("domains")
    if not isinstance(doms, dict) or not doms:
        _fail(path, "`domains` must be a non-empty mapping name -> {source: ...}")
    out: dict[str, Domain] = {}
    for name, spec in doms.items():
        if not isinstance(spec, dict):
            _fail(path, f"domain {name!r} must be a mapping with a `source`")
        bad = set(spec) - _DOMAIN_KEYS
        if bad:
            _fail(path, f"domain {name!r}: unknown key(s) {sorted(bad)}; allowed: {sorted(_DOMAIN_KEYS)}")
        src = spec.get("source")
        if not isinstance(src, dict) or src.get("type") not in _SOURCE_KEYS:
            _fail(path, f"domain {name!r}: `source.type` must be one of {sorted(_SOURCE_KEYS)}")
        kind = src["type"]
        bad = set(src) - _SOURCE_KEYS[kind]
        if bad:
            _fail(
                path,
                f"domain {name!r}: unknown {kind} source key(s) {sorted(bad)}; allowed: {sorted(_SOURCE_KEYS[kind])}",
            )
        if kind == "local":
            patterns = src.get("files")
            if isinstance(patterns, str):
                patterns = [patterns]
            if not patterns:
                _fail(path, f"domain {name!r}: local source needs `files` (paths or globs)")
            files: list[str] = []
            for pat in patterns:
                if not isinstance(pat, str):
                    _fail(path, f"domain {name!r}: `files` entries must be paths or globs, got {pat!r}")
                pat = os.path.expandvars(os.path.expanduser(pat))  # ~ and $HOME, as a shell would
                if "$" in pat:
                    _fail(path, f"domain {name!r}: {pat!r} names an unset environment variable; set it or "
                                "write the path out")  # fmt: skip
                full = pat if Path(pat).is_absolute() else str(path.parent / pat)
                hits = sorted(glob.glob(full))
                if not hits:
                    _fail(path, f"domain {name!r}: no file matches {pat!r} (looked for {full})")
                files.extend(hits)
            for f in files:
                if Path(f).stat().st_size == 0:
                    _fail(path, f"domain {name!r}: file {f} is empty; remove it or add text")
            source = DomainSource(type="local", files=tuple(files), text_field=src.get("text_field", "text"))
        elif kind == "hub":
            if not src.get("id"):
                _fail(path, f"domain {name!r}: hub source needs `id`")
            source = DomainSource(
                type="hub",
                id=src["id"],
                config=src.get("config"),
                split=src.get("split", "train"),
                text_field=src.get("text_field", "text"),
                revision=src.get("revision"),
            )
        else:
            from dive_ds.data.demo_pack import DEMO_DOMAINS

            if src.get("name") not in DEMO_DOMAINS:
                _fail(
                    path,
                    f"domain {name!r}: unknown demo domain {src.get('name')!r}; known: {list(DEMO_DOMAINS)}",
                )
            source = DomainSource(type="demo", name=src["name"])
        weight = float(spec.get("weight", 1.0))
        if weight <= 0:
            _fail(path, f"domain {name!r}: weight must be > 0 (got {weight})")
        out[str(name)] = Domain(name=str(name), source=source, family=spec.get("family"), weight=weight)
    return Registry(path=path, domains=out)


def _local_dataset(source: DomainSource):
    import datasets

    suffixes = {Path(f).suffix for f in source.files}
    if len(suffixes) != 1:
        raise ValueError(
            f"mixed file types {sorted(suffixes)} in one domain; split them into separate domains"
        )
    suffix = suffixes.pop()
    builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(
            f"unsupported file type {suffix!r} ({source.files[0]}); use .txt, .jsonl, .json or .parquet"
        )
    for f in source.files:
        _check_local_file(Path(f), suffix)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    # local files load in well under a second; their "Generating train split" bars are noise
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=list(source.files), split="train", **kwargs)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__ or e
        why = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ValueError(
            f"cannot read {', '.join(map(str, source.files))} ({why}); fix or remove the file"
        ) from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _check_local_file(path: Path, suffix: str) -> None:
    """A .txt must be UTF-8, a .jsonl one JSON object per line: else one line naming the file and line
    (the datasets library would fail with a multi-line DatasetGenerationError naming neither)."""
    if suffix not in (".txt", ".jsonl"):
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {n}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file"
                ) from None
            if suffix == ".jsonl" and line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not a JSON object ({e.msg}); fix the line") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}, line {n}: a JSON {type(row).__name__}, not an object; fix the line"
                    )


def iter_documents(domain: Domain, max_chars: int | None = None) -> Iterator[str]:
    """Yield the domain's documents in their stored order, stopping after `max_chars` characters."""
    src = domain.source
    if src.type == "demo":
        from dive_ds.data.demo_pack import demo_registry_path

        pack = load_registry(demo_registry_path())
        yield from iter_documents(
            Domain(domain.name, pack.domains[src.name].source, domain.family), max_chars
        )
        return
    if src.type == "local":
        ds = _local_dataset(src)
        field_name = "text" if Path(src.files[0]).suffix == ".txt" else src.text_field
    else:
        import datasets

        ds = datasets.load_dataset(src.id, src.config, split=src.split, revision=src.revision, streaming=True)
        field_name = src.text_field
    if field_name not in (ds.column_names or [field_name]):
        raise ValueError(
            f"domain {domain.name!r}: no field {field_name!r} in its data "
            f"(columns: {ds.column_names}); set `text_field` in the registry"
        )
    total = 0
    for row in ds:
        text = row[field_name]
        if not isinstance(text, str) or not text.strip():
            continue
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return
