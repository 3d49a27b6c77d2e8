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

import dataclasses
import math
from dataclasses import dataclass, field

from dive_ds.data.split import SplitConfig

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
    at_end: bool = True
    """Evaluate after a stage's last step (its summary's final_eval); false when the caller scores the
    output itself (the demo evaluates the retrained model on its own windows)."""


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
        return plain(raw)


def stage_steps(stage: StageConfig, train: TrainConfig, data: DataConfig) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (train.global_batch_size * data.seq_len)))


def stage_temperature(stage: StageConfig, top_k: int) -> float:
    """The paper's dense-routing temperatures: 0.05 for top-1 models (1/8), 0.5 for top-2 (2/8)."""
    if stage.temperature is not None:
        return stage.temperature
    return 0.05 if top_k == 1 else 0.5


def plain(obj):
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj
