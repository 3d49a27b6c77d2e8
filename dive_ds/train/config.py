"""Run configuration of DIVE retraining: small frozen dataclasses, one per component.

A run config is a YAML or JSON file (see configs/demo_retrain.yaml):

    out_dir: runs/demo/retrain
    model: {path: runs/demo/moe-dive}
    data: {registry: demo, seq_len: 1024}
    train: {global_batch_size: 8, precision: fp32}
    stages:
      router:  {steps: 100}
      experts: {steps: 1000, lr: 1.0e-4}
      continue: {enabled: false}
    checkpoint: {every: 100, keep: 2}
    eval: {every: 100, calib_dir: runs/demo/calib}
    logging: {every: 10}

Single fields are overridden from the command line with `--set stages.experts.lr=5e-5` (the
value is parsed as YAML). Unknown keys and wrongly typed values are one-line ValueErrors.
The DeepSpeed JSON is cross-checked against this config by `dive_ds.train.ds_config.resolve_ds_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dive_ds.data.split import SplitConfig
from dive_ds.io.mapping import DuplicateKey, parse_mapping_text

STAGE_ORDER = ("router", "experts", "continue")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
RESUME_MODES = ("auto", "never", "required")


@dataclass(frozen=True)
class ModelConfig:
    """The MoE checkpoint to retrain and how to load it."""

    path: str = ""
    """MoE checkpoint folder in Hugging Face format (from `dive-ds reconstruct`)."""
    zero3_init: bool = True
    """ZeRO-3 only: load with `HfDeepSpeedConfig` alive so each rank materialises only its partition
    (real weights, never a bare `zero.Init`). False: every rank loads the full model, then partitions."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward pass (less activation memory, ~30% more compute)."""
    max_abs_weight: float = 1.0e4
    """Sanity bound checked after loading: every parameter finite and |w| below this."""


@dataclass(frozen=True)
class DataConfig:
    """Training stream: weighted mixture of registry domains, tokenised and packed."""

    registry: str = "demo"
    """Domain registry file (JSON/YAML), or `demo` for the built-in demo pack."""
    domains: tuple[str, ...] = ()
    """Domains of the registry to train on; empty = all."""
    weights: dict[str, float] = field(default_factory=dict)
    """Mixture weight per domain (overrides the registry's `weight`); unnormalised."""
    seq_len: int = 1024
    """Tokens per packed training sequence."""
    seed: int = 1234
    """Seed of the domain choice per sequence and of the document shuffle."""
    tokenizer: str | None = None
    """Tokenizer folder; None = the model folder's tokenizer; `bytes` = UTF-8 bytes (ids 0-255, EOS 256),
    for tiny debug models with vocab_size >= 257."""
    shuffle_buffer: int = 1024
    """Documents shuffled together (a block of the stored order); bounds the stream's memory."""
    split: SplitConfig = SplitConfig()
    """The four-way split of every domain (dive_ds.data.split): the stream trains on the `train` set only;
    the eval curve reads the `eval` set. Keep it equal to the calibration's (`calibrate` records it)."""
    overfit_sequences: int = 0
    """Debug: > 0 repeats only the first n packed sequences forever (a memorisable stream)."""


@dataclass(frozen=True)
class TrainConfig:
    """What is shared by all stages: batch, precision, seeds."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks (= micro batch x grad accumulation x world size)."""
    precision: str = "fp32"
    """fp32 or bf16; must agree with the DeepSpeed JSON's `bf16.enabled`."""
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages this run accepts from the DeepSpeed JSON."""
    allow_cpu_bf16: bool = False
    """bf16 on a CPU accelerator is refused unless this is set (slow, and no exact resume)."""
    seed: int = 42
    """Seed of LoRA init and of the per-micro-batch RNG (router noise, dropout)."""
    rng_per_micro_batch: bool = True
    """Reseed torch's RNG before every micro batch from (seed, step, micro batch index in the global
    batch): noise and dropout then do not depend on the number of ranks."""


@dataclass(frozen=True)
class StageConfig:
    """One retraining stage (defaults depend on the stage: see STAGE_DEFAULTS)."""

    name: str = "router"
    """router, experts or continue (the mapping key in the file)."""
    enabled: bool = True
    """Run this stage."""
    steps: int | None = None
    """Optimizer steps; None = derive from `tokens`."""
    tokens: int | None = None
    """Training tokens (used when steps is None): steps = ceil(tokens / (global batch x seq_len))."""
    lr: float = 1.0e-4
    """Peak learning rate (replaces the DeepSpeed JSON's optimizer lr)."""
    schedule: str = "constant"
    """constant or cosine (linear warm-up, then cosine down to min_lr_ratio x lr)."""
    warmup_ratio: float = 0.0
    """Fraction of the stage's steps spent in linear warm-up."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    router_mode: str = "dense"
    """dense (every expert, softmax(logits / t)) or sparse (noisy top-k in training)."""
    temperature: float | None = None
    """Dense routing temperature; None = 0.05 for top-1 models, 0.5 otherwise (the paper's values)."""
    router_noise: bool = True
    """Sparse mode: noisy top-k in training (the model's own setting when True)."""
    router_gate: str | None = None
    """Sparse-mode routing weights: renorm, straight_through or switch (see DiveMoeConfig.router_gate);
    None keeps the model's own. The choice is saved in the stage's output config (inference uses it too)."""
    lora: bool = False
    """Put LoRA on the experts' gate/up/down projections (merged when the stage ends)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha (scale = alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    train_router: bool = True
    """Routers (`mlp.gate.weight`, `mlp.gate.noise_weight`) train."""
    train_norms: bool = False
    """All RMSNorms train."""
    train_expert_bias: bool = False
    """The experts' output bias (FLAP compensation) trains."""
    unfreeze_attention: bool = False
    """Attention projections train too (the paper keeps them frozen)."""
    unfreeze_embeddings: bool = False
    """Token embeddings (and a tied LM head) train too."""
    aux_loss_coef: float = 0.0
    """Load-balancing loss coefficient (Switch style: E x sum_e f_e P_e, averaged over layers); 0 = off."""
    init_from: str | None = None
    """Start from this HF folder instead of the previous stage's output (or model.path)."""


STAGE_DEFAULTS: dict[str, dict] = {
    "router": dict(
        lr=1.0e-4,
        schedule="constant",
        router_mode="dense",
        lora=False,
        train_router=True,
        train_norms=False,
        steps=100,
    ),
    "experts": dict(
        lr=1.0e-4,
        schedule="cosine",
        warmup_ratio=0.03,
        min_lr_ratio=0.1,
        router_mode="sparse",
        lora=True,
        train_router=True,
        train_norms=True,
        steps=1000,
    ),
    "continue": dict(
        enabled=False,
        lr=1.0e-5,
        schedule="constant",
        router_mode="sparse",
        lora=True,
        train_router=True,
        train_norms=True,
        steps=1000,
    ),
}


@dataclass(frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints of the running stage."""

    every: int = 500
    """Save every n optimizer steps (and always at the end of a stage); 0 = only at the end."""
    keep: int = 2
    """Keep the last n checkpoints of a stage."""
    exclude_frozen: bool = False
    """Leave frozen weights out of checkpoints: they are the stage's input model, re-read from there on
    resume and on consolidation, so a checkpoint shrinks to the trainable weights and their optimizer state."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint when there is one; never: start over (refuses a run
    folder that holds checkpoints); required: fail if there is none."""


@dataclass(frozen=True)
class EvalConfig:
    """Held-out perplexity per domain."""

    every: int = 200
    """Evaluate every n steps (and at the end of a stage); 0 = only at the end."""
    calib_dir: str | None = None
    """Calibration folder whose selection windows are used; None = windows spread over the evaluation
    set (data.split) of the training domains."""
    windows_per_domain: int = 8
    """Evaluation windows per domain."""
    seq_len: int | None = None
    """Window length for stream windows; None = data.seq_len."""
    batch_size: int = 4
    """Windows per forward."""
    at_start: bool = True
    """Also evaluate before a stage's first step (the baseline of its curve)."""


@dataclass(frozen=True)
class LoggingConfig:
    """TensorBoard, console and progress bar."""

    tensorboard: bool = True
    """Write TensorBoard event files to OUT/tb (rank 0)."""
    every: int = 10
    """Log scalars every n steps."""
    heatmap_every: int = 100
    """Add the expert-load heatmap image every n steps (0 = only at the end of a stage)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    per_expert_scalars: bool = True
    """One scalar per layer and expert for the load share (else only the per-layer CV)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the MoE is spread over ranks (beyond ZeRO's data parallelism)."""

    ep_size: int | None = None
    """Expert-parallel size P: each rank holds E / P experts of every layer, tokens travel by all-to-all.
    An integer is exact: a launch whose world size or experts per layer it does not divide is refused.
    None (the default) follows the launch: the DeepSpeed JSON's `expert_parallel.autoep_size`, lowered to
    the largest size that divides the world size and the experts (printed, and recorded in run_info.json);
    no expert parallelism when the JSON has no enabled section. 1 turns expert parallelism off."""


@dataclass(frozen=True)
class RunConfig:
    """A whole retraining run."""

    out_dir: str = "runs/retrain"
    """Run folder: resolved configs, checkpoints, TensorBoard, stage outputs, final model."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: tuple[StageConfig, ...] = ()
    """Filled from the `stages:` mapping, in the fixed order router, experts, continue."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)

    def enabled_stages(self) -> list[StageConfig]:
        return [s for s in self.stages if s.enabled]

    def to_dict(self) -> dict:
        raw = dataclasses.asdict(self)
        raw["stages"] = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in raw["stages"]}
        return _plain(raw)


# --------------------------------------------------------------------------- loading


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


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


def stage_steps(stage: StageConfig, train: TrainConfig, data: DataConfig) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (train.global_batch_size * data.seq_len)))


def stage_temperature(stage: StageConfig, top_k: int) -> float:
    """The paper's dense-routing temperatures: 0.05 for top-1 models (1/8), 0.5 for top-2 (2/8)."""
    if stage.temperature is not None:
        return stage.temperature
    return 0.05 if top_k == 1 else 0.5
