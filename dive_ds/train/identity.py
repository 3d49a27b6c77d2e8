"""The identity of a retraining run, recorded in its out_dir and checked on every launch.

A run folder belongs to one run: the input model (absolute path and fingerprint) and every setting
that changes the weights or the recorded curves (data, batch, precision, seeds, each stage's
settings, the evaluation windows). Relaunching the same run resumes it; a run whose identity adds
stages after the recorded ones (e.g. enabling `continue` after a finished run) extends it;
anything else is refused in one line, unless --force, which moves the earlier run's files into
OUT/superseded-<time>/ (nothing is ever deleted) and starts afresh.

Settings that do not change results (logging, checkpoint cadence, ZeRO stage choice, expert
parallelism, evaluation cadence) are not part of the identity: changing them on a resume is fine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dive_ds.io.fingerprint import input_record
from dive_ds.train.config import RunConfig

RUN_RECORD = "run_identity.json"
RUN_ENTRIES = (
    RUN_RECORD, "run_config.yaml", "ds_config.json", "run_info.json", "launches.jsonl", "metrics.jsonl",
    "tb", "stages", "model",
)  # fmt: skip
"""Top-level names a run writes into its out_dir."""
_TRAIN_KEYS = ("global_batch_size", "precision", "seed", "rng_per_micro_batch")
_EVAL_KEYS = ("calib_dir", "windows_per_domain", "seq_len")


def _abs(path: str | None) -> str | None:
    """An existing local path made absolute (so a relaunch from another directory is the same run)."""
    if not path or not Path(path).exists():
        return path
    return str(Path(path).resolve())


def settings_identity(raw: dict) -> dict:
    """The result-changing settings of a run config (as RunConfig.to_dict() writes it)."""
    data = dict(raw.get("data", {}))
    data["registry"] = _abs(data.get("registry"))
    data["tokenizer"] = _abs(data.get("tokenizer"))
    ev = {k: raw.get("eval", {}).get(k) for k in _EVAL_KEYS}
    ev["calib_dir"] = _abs(ev["calib_dir"])
    stages = {}
    for name, s in raw.get("stages", {}).items():
        if s.get("enabled", True):
            stages[name] = {k: v for k, v in s.items() if k not in ("enabled", "init_from")}
            stages[name]["init_from"] = _abs(s.get("init_from"))
    return {
        "data": data,
        "train": {k: raw.get("train", {}).get(k) for k in _TRAIN_KEYS},
        "eval": ev,
        "stages": stages,
    }


def _input(path: str) -> dict:
    if not (Path(path) / "config.json").is_file():  # not a model (yet): the stage checks say so
        return {"path": str(Path(path).absolute()), "fingerprint": None}
    return input_record(path)


def run_identity(run: RunConfig) -> dict:
    """The identity of `run`: its settings plus the absolute path and fingerprint of every input model."""
    ident = {"model": _input(run.model.path) if run.model.path else None} | settings_identity(run.to_dict())
    for s in ident["stages"].values():
        if s["init_from"]:
            s["init_from"] = _input(s["init_from"])
    return json.loads(json.dumps(ident))  # as it reads back from the record


def _difference(old, new, where: str) -> str | None:
    """`key: old != new` for the first differing entry (dotted key path), None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if old == new else f"{where}: {old!r} != {new!r}"


def _unknown_where_gone(old: dict, new: dict) -> dict:
    """`old` with the fingerprints of inputs that are gone now (fingerprint None in `new`) dropped:
    only their paths can be compared (the stage that needs one reports it missing)."""
    old = json.loads(json.dumps(old))
    pairs = [(old.get("model"), new.get("model"))]
    pairs += [(s.get("init_from"), new.get("stages", {}).get(n, {}).get("init_from"))
              for n, s in old.get("stages", {}).items()]  # fmt: skip
    for o, n in pairs:
        if isinstance(o, dict) and isinstance(n, dict) and n.get("fingerprint") is None:
            o["fingerprint"] = None
    return old


def identity_conflict(old: dict, new: dict) -> str | None:
    """Why `new` is not the run recorded as `old` (None: the same run, or the same with stages added)."""
    old = _unknown_where_gone(old, new)
    for key in sorted((set(old) | set(new)) - {"stages"}):
        if old.get(key) != new.get(key):
            return _difference(old.get(key), new.get(key), key)
    before, after = list(old.get("stages", {})), list(new.get("stages", {}))
    if after[: len(before)] != before:
        return f"stages: {', '.join(before)} != {', '.join(after)}"
    return _difference(old["stages"], {k: new["stages"][k] for k in before}, "stages")


def _legacy_identity(out: Path, new: dict) -> dict | None:
    """A run folder from before run_identity.json: its identity rebuilt from run_config.yaml (the model
    by path only, its fingerprint was not recorded); None when there is none."""
    import yaml

    try:
        raw = yaml.safe_load((out / "run_config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    path = (raw.get("model") or {}).get("path")
    old = {"model": {"path": _abs(path)} if path else None} | settings_identity(raw)
    for name, s in old["stages"].items():
        ref = new["stages"].get(name, {}).get("init_from")
        if s["init_from"] and isinstance(ref, dict) and ref["path"] == s["init_from"]:
            s["init_from"] = ref
        elif s["init_from"]:
            s["init_from"] = {"path": s["init_from"]}
    if old["model"] and new["model"] and old["model"]["path"] == new["model"]["path"]:
        old["model"] = new["model"]
    return old


def claim_run_dir(out: Path, identity: dict, force: bool) -> str:
    """May this run use `out`? -> "new" (absent or empty), "same" (this run: resume or extend it),
    "force" (another run or foreign files, and --force: the caller moves them aside with
    supersede()). Raises a one-line ValueError otherwise. Reads only: safe on every rank."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"run config: out_dir {out} exists and is not a folder; choose another out_dir")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    record = out / RUN_RECORD
    if record.is_file():
        try:
            old = json.loads(record.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{record} is unreadable ({type(e).__name__}); restore it or choose another out_dir"
            ) from None
    else:
        old = _legacy_identity(out, identity)
    if old is None:
        if force:
            return "force"
        raise ValueError(
            f"run config: out_dir {out} is not empty and holds no {RUN_RECORD} of a retraining run; "
            "choose another out_dir or pass --force (which moves nothing but same-named entries aside)"
        )
    conflict = identity_conflict(old, identity)
    if conflict is None:
        return "same"
    if force:
        return "force"
    raise ValueError(
        f"run config: out_dir {out} holds a different run ({conflict}); choose another out_dir or pass "
        "--force (which moves that run's files into a superseded-* folder there)"
    )


def supersede(out: Path) -> Path | None:
    """Move every entry a run writes (RUN_ENTRIES) out of `out` into OUT/superseded-<time>/ -> that folder."""
    present = [name for name in RUN_ENTRIES if (out / name).exists() or (out / name).is_symlink()]
    if not present:
        return None
    dest = out / time.strftime("superseded-%Y%m%d-%H%M%S")
    n = 0
    while dest.exists():
        n += 1
        dest = out / f"{time.strftime('superseded-%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for name in present:
        (out / name).rename(dest / name)
    return dest


def write_identity(out: Path, identity: dict) -> None:
    from dive_ds.io import atomic

    atomic.write_json(out / RUN_RECORD, {"identity": identity})
