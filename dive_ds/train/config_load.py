"""Reading a run config: YAML/JSON (safe loaders only), --set overrides, type coercion with one-line
errors naming the field, and the cross-field checks (validate_run_config), into the dataclasses of
dive_ds/train/config.py."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import yaml

from dive_ds.io.mapping import DuplicateKey, parse_mapping_text
from dive_ds.train.config import (
    PRECISIONS,
    RESUME_MODES,
    SCHEDULES,
    STAGE_DEFAULTS,
    STAGE_ORDER,
    RunConfig,
    StageConfig,
)

# --------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, where: str):
    """Check (and lightly coerce: int -> float, list -> tuple) a value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp}")


def _build(cls, raw, where: str, defaults: dict | None = None):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'run config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "name" or cls is not StageConfig]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ValueError(f"run config: unknown key '{key}'; allowed: {', '.join(sorted(names))}")
    kwargs = dict(defaults or {})
    for name, value in raw.items():
        sub = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, sub)
        else:
            kwargs[name] = _coerce(value, tp, f"run config: {sub}")
    return cls(**kwargs)


def _build_stages(raw, where: str = "stages") -> tuple[StageConfig, ...]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"run config: `stages` must map stage names ({', '.join(STAGE_ORDER)}) to settings")
    unknown = [k for k in raw if k not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"run config: unknown key '{where}.{unknown[0]}'; allowed: {', '.join(STAGE_ORDER)}")
    return tuple(
        _build(StageConfig, raw.get(name), f"{where}.{name}", {"name": name, **STAGE_DEFAULTS[name]})
        for name in STAGE_ORDER
    )


def run_config_from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig from a plain mapping (as read from YAML/JSON)."""
    if not isinstance(raw, dict):
        raise ValueError(
            "run config: the top level must be a mapping (out_dir, model, data, train, stages, ...)"
        )
    raw = dict(raw)
    stages = _build_stages(raw.pop("stages", None))
    cfg = _build(RunConfig, raw, "")
    cfg = dataclasses.replace(cfg, stages=stages)
    validate_run_config(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r}: use KEY=VALUE, e.g. stages.experts.lr=5e-5")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: value is not valid YAML ({e})".splitlines()[0]) from e
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {p!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def read_mapping(path: str | Path, what: str = "run config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist; pass an existing YAML or JSON file")
    text = path.read_text()
    try:
        raw = parse_mapping_text(text, path.suffix == ".json")
    except DuplicateKey as e:
        raise ValueError(f"{path}: {e}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"{what} {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {e}".splitlines()[0]
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path}: the top level must be a mapping")
    return raw


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Read a YAML/JSON run config (or start from `base`), apply `--set` overrides, validate."""
    raw = read_mapping(path) if path is not None else dict(base or {})
    return run_config_from_dict(apply_overrides(raw, overrides or []))


def validate_run_config(cfg: RunConfig) -> None:
    """Value checks that need no files (one-line ValueErrors naming the value and the fix)."""
    if not cfg.out_dir:
        raise ValueError("run config: out_dir is empty; name a run folder")
    _check_finite(cfg.to_dict(), "run config")
    if cfg.model.path:  # a run never writes into its own input, nor holds it inside its folder
        out, model = Path(cfg.out_dir).resolve(), Path(cfg.model.path).resolve()
        where = "is" if out == model else "is inside" if model in out.parents else "contains"
        if out == model or model in out.parents or out in model.parents:
            raise ValueError(
                f"run config: out_dir {cfg.out_dir} {where} model.path {cfg.model.path}; "
                "a run never writes into its input: choose an out_dir outside the model folder"
            )
    d, t = cfg.data, cfg.train
    if d.seed < 0 or t.seed < 0:
        raise ValueError(f"run config: data.seed={d.seed}, train.seed={t.seed}; use seeds >= 0")
    if d.overfit_sequences < 0:
        raise ValueError(f"run config: data.overfit_sequences={d.overfit_sequences}; use 0 (off) or >= 1")
    if cfg.model.max_abs_weight <= 0:
        raise ValueError(f"run config: model.max_abs_weight={cfg.model.max_abs_weight}; use a bound > 0")
    if cfg.eval.seq_len is not None and cfg.eval.seq_len < 2:
        raise ValueError(f"run config: eval.seq_len={cfg.eval.seq_len}; use >= 2 (or null: data.seq_len)")
    if d.seq_len < 2:
        raise ValueError(f"run config: data.seq_len={d.seq_len}; use >= 2")
    if d.shuffle_buffer < 1:
        raise ValueError(f"run config: data.shuffle_buffer={d.shuffle_buffer}; use >= 1")
    if any(w <= 0 for w in d.weights.values()):
        raise ValueError(f"run config: data.weights {d.weights} must all be > 0")
    if t.global_batch_size < 1:
        raise ValueError(f"run config: train.global_batch_size={t.global_batch_size}; use >= 1")
    if t.precision not in PRECISIONS:
        raise ValueError(f"run config: train.precision={t.precision!r}; use one of {PRECISIONS}")
    if cfg.parallel.ep_size is not None and cfg.parallel.ep_size < 1:
        raise ValueError(f"run config: parallel.ep_size={cfg.parallel.ep_size}; use >= 1 (or null: none)")
    if not set(t.zero_stages) <= {0, 1, 2, 3} or not t.zero_stages:
        raise ValueError(f"run config: train.zero_stages={list(t.zero_stages)}; choose from 0, 1, 2, 3")
    for s in cfg.stages:
        w = f"run config: stages.{s.name}"
        if s.steps is None and s.tokens is None:
            raise ValueError(f"{w}: set steps or tokens")
        if s.steps is not None and s.steps < 1:
            raise ValueError(f"{w}.steps={s.steps}; use >= 1")
        if s.tokens is not None and s.tokens < 1:
            raise ValueError(f"{w}.tokens={s.tokens}; use >= 1")
        if s.lr <= 0:
            raise ValueError(f"{w}.lr={s.lr}; use a learning rate > 0")
        if s.schedule not in SCHEDULES:
            raise ValueError(f"{w}.schedule={s.schedule!r}; use one of {SCHEDULES}")
        if not 0 <= s.warmup_ratio < 1:
            raise ValueError(f"{w}.warmup_ratio={s.warmup_ratio}; use 0 <= ratio < 1")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ValueError(f"{w}.min_lr_ratio={s.min_lr_ratio}; use 0 <= ratio <= 1")
        if s.router_mode not in ("dense", "sparse"):
            raise ValueError(f"{w}.router_mode={s.router_mode!r}; use dense or sparse")
        if s.router_gate not in (None, "renorm", "straight_through", "switch"):
            raise ValueError(f"{w}.router_gate={s.router_gate!r}; use renorm, straight_through or switch")
        if s.temperature is not None and s.temperature <= 0:
            raise ValueError(f"{w}.temperature={s.temperature}; use > 0")
        if s.lora_r < 1 or s.lora_alpha <= 0 or not 0 <= s.lora_dropout < 1:
            raise ValueError(f"{w}: LoRA needs lora_r >= 1, lora_alpha > 0, 0 <= lora_dropout < 1")
        if s.aux_loss_coef < 0:
            raise ValueError(f"{w}.aux_loss_coef={s.aux_loss_coef}; use >= 0")
    c = cfg.checkpoint
    if c.every < 0 or c.keep < 1:
        raise ValueError(
            f"run config: checkpoint.every={c.every}, keep={c.keep}; use every >= 0 and keep >= 1"
        )
    if c.resume not in RESUME_MODES:
        raise ValueError(f"run config: checkpoint.resume={c.resume!r}; use one of {RESUME_MODES}")
    e = cfg.eval
    if e.every < 0 or e.windows_per_domain < 1 or e.batch_size < 1:
        raise ValueError("run config: eval needs every >= 0, windows_per_domain >= 1, batch_size >= 1")
    if cfg.logging.every < 1 or cfg.logging.heatmap_every < 0:
        raise ValueError("run config: logging needs every >= 1 and heatmap_every >= 0")


def _check_finite(raw, where: str) -> None:
    """Every number of the config is finite (NaN passes every `<` check, so ranges alone miss it)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            _check_finite(value, f"{where}: {key}" if where == "run config" else f"{where}.{key}")
    elif isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"{where}={raw}; use a finite number")
