"""What `dive-ds compare` builds and trains: its config, the models (method x grouping seed x router
treatment) and the training runs (x data seed), in the order that finishes the headline first."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dive_ds.build.router_config import RouterFitConfig

SEEDED = ("nomining", "llama-moe", "random-halves")


MOE_METHODS = ("dive", *SEEDED)


DENSE_METHODS = ("flap", "flap-adaptive", "flap-eqtrain")


ALIASES = {"random-split": "random-halves"}

SHARED_PREFIX = "dive-shared"
"""`dive-shared<s>` (e.g. dive-shared0.25): DIVE with an always-on shared expert of s x F (reconstruct
--shared-ratio s), the routed experts (1 - r - s) F each: the same activated width as DIVE."""


def shared_ratio_of(method: str) -> float | None:
    """s of a `dive-shared<s>` method (None for any other method)."""
    if not method.startswith(SHARED_PREFIX):
        return None
    try:
        return float(method[len(SHARED_PREFIX) :])
    except ValueError:
        raise ValueError(
            f"--methods {method!r}: write the shared ratio after it, e.g. dive-shared0.25"
        ) from None


CLUSTERS = "dive-clusters"
"""DIVE's experts cut from each layer's token clusters instead of domain groups (needs a calibration made with
`--token-clusters` = --experts)."""


def is_dive(method: str) -> bool:
    """DIVE itself or a DIVE variant (the shared-expert ones, the token-cluster one)."""
    return method in ("dive", CLUSTERS) or shared_ratio_of(method) is not None


def uses_groups(method: str) -> bool:
    """Built on the mined domain groups (--groups)."""
    return method == "dive" or shared_ratio_of(method) is not None


@dataclass(frozen=True)
class CompareConfig:
    """What every method gets: the same shape, budget and evaluation."""

    experts: int = 6
    top_k: int = 1
    prune_ratio: float = 0.5
    steps: int = 64
    """Optimizer steps per method (the whole training budget)."""
    router_steps: int = 16
    """Of those, the router stage's steps in the random-router treatment (the rest: experts stage)."""
    batch: int = 4
    """Sequences per step."""
    seq_len: int = 256
    lr: float = 1e-4
    eval_every: int = 16
    """Steps between held-out evaluations (the points of the ppl-vs-tokens curve)."""
    eval_windows: int = 16
    """Evaluation windows per seen domain, spread over its evaluation set (all there are, if fewer)."""
    unseen_windows: int = 16
    """The same per --eval-domains domain."""
    curve_windows: int = 4
    """Windows per domain of the trainer's own eval curve (evaluation set)."""
    methods: tuple[str, ...] = ("dive", "nomining", "llama-moe", "flap", "flap-adaptive")
    treatments: tuple[str, ...] = ("fitted", "random")
    grouping_seeds: tuple[int, ...] = (42,)
    """Seeds of the seeded baselines' groupings / splits (one model each)."""
    data_seeds: tuple[int, ...] = (1234,)
    """Training-data seeds (data.seed): DIVE and the FLAPs are trained once per seed, the seeded baselines
    and flap-eqtrain with the first (see HEADLINE)."""
    seed: int = 42
    """Seed of DIVE's and FLAP's router init and of the LoRA init."""
    bootstrap: int = 2000
    """Paired bootstrap resamples per ratio."""
    lambada: int | None = 0
    """LAMBADA-style items (dive_ds.eval.lambada, the unseen pack's narrative evaluation set) scored per
    model and run: 0 = all of them, n = a seeded subsample of n, None = none."""
    fit: RouterFitConfig = field(default_factory=RouterFitConfig)

    def __post_init__(self):
        methods = tuple(ALIASES.get(m, m) for m in self.methods)
        object.__setattr__(self, "methods", methods)
        bad = [
            m
            for m in methods
            if m not in (*MOE_METHODS, *DENSE_METHODS, CLUSTERS) and shared_ratio_of(m) is None
        ]
        if bad:
            raise ValueError(f"--methods {bad[0]!r}: choose from {', '.join((*MOE_METHODS, *DENSE_METHODS))} "
                             f"{CLUSTERS} or {SHARED_PREFIX}<s>")  # fmt: skip
        for m in methods:
            s = shared_ratio_of(m)
            if s is not None and not 0 < s < 1 - self.prune_ratio:
                raise ValueError(
                    f"--methods {m}: the shared ratio must be in (0, 1 - r = {1 - self.prune_ratio:g})"
                )
        if "flap-eqtrain" in methods and "dive" not in methods:
            raise ValueError("--methods flap-eqtrain matches DIVE's trainable parameters: add dive")
        bad = [t for t in self.treatments if t not in ("fitted", "random")]
        if bad or not self.treatments:
            raise ValueError(f"--treatments {','.join(self.treatments)!r}: choose fitted and/or random")
        if self.steps < 1 or not 0 <= self.router_steps < (
            self.steps if "random" in self.treatments else 2**31
        ):
            raise ValueError(
                f"--steps {self.steps} --router-steps {self.router_steps}: use steps >= 1 and 0 <= router steps < steps"
            )
        if self.eval_every < 1:
            raise ValueError(f"--eval-every {self.eval_every}: use >= 1")
        if not self.grouping_seeds or not self.data_seeds:
            raise ValueError("--grouping-seeds and --data-seeds need at least one seed each")
        a = self.top_k * (1 - self.prune_ratio)
        if not 0 < a < 1:
            raise ValueError(
                f"--top-k {self.top_k} x (1 - --prune-ratio {self.prune_ratio}) = {a:g} of the FFN is active: "
                "the dense baselines need a share below 1; lower --top-k or raise --prune-ratio"
            )
        if "llama-moe" in methods and abs(self.experts * a - round(self.experts * a)) > 1e-9:
            raise ValueError(
                f"--methods llama-moe activates {self.experts} x {a:g} of its {self.experts} experts of "
                f"F/{self.experts}: not a whole number; choose --experts N with N x k x (1 - r) whole"
            )
        if "flap-eqtrain" in methods and "fitted" not in self.treatments:
            raise ValueError(
                "--methods flap-eqtrain matches dive-fitted's trainable parameters: add --treatments fitted"
            )


QUICK = dict(steps=2, router_steps=1, batch=2, eval_every=1, eval_windows=2, unseen_windows=2, curve_windows=1,
             bootstrap=200, lambada=8)  # fmt: skip
"""`--quick`: the whole command in minutes (tests)."""


@dataclass(frozen=True)
class Build:
    """One model to build: its folder name, method, treatment and grouping seed."""

    name: str
    method: str
    treatment: str
    seed: int


def builds(cfg: CompareConfig) -> list[Build]:
    """Every model: the dense baselines first, then treatment by treatment (every method's fitted model
    before any random one), so an interrupted comparison has whole columns to compare."""
    out = [Build(m, m, "-", cfg.seed) for m in DENSE_METHODS if m in cfg.methods]
    for t in cfg.treatments:
        for m in cfg.methods:
            if is_dive(m):
                out.append(Build(f"{m}-{t}", m, t, cfg.seed))
            elif m in SEEDED:
                out += [Build(f"{m}-s{s}-{t}", m, t, s) for s in cfg.grouping_seeds]
    return out


RUN_ORDER = ("flap", "dive", "nomining", "flap-eqtrain", "flap-adaptive", SHARED_PREFIX, "llama-moe",
             "random-halves")  # fmt: skip
"""The order training runs go in, most telling first, so that an interrupted comparison (hours on a CPU)
has the headline: uniform FLAP and DIVE with every data seed, then the mining ablation, flap-eqtrain
(after dive-fitted: its LoRA rank comes from DIVE's trainable count), the rest."""


def run_names(cfg: CompareConfig) -> list[tuple[str, Build, int]]:
    """(training run name, model, data seed) of every training run, in RUN_ORDER; the headline pair
    (flap, dive) goes data seed by data seed."""
    runs = [(f"{b.name}-d{d}", b, d) for b in builds(cfg) for d in data_seeds_of(b, cfg)]

    def key(r: tuple[str, Build, int]) -> tuple:
        _, b, d = r
        pair = b.method in ("flap", "dive")
        order = RUN_ORDER.index(SHARED_PREFIX if is_dive(b.method) and b.method != "dive" else b.method)
        return (not pair, cfg.data_seeds.index(d) if pair else 0, order,
                b.treatment != "fitted", b.seed, cfg.data_seeds.index(d))  # fmt: skip

    return sorted(runs, key=key)


HEADLINE = ("dive", "flap", "flap-adaptive")
"""Methods trained once per data seed, with every DIVE variant (shared expert, token clusters: each is
judged against DIVE, seed by seed); the seeded baselines (their spread comes from the grouping seeds)
and flap-eqtrain are trained with the first data seed only, which keeps the budget to what a machine can run."""


def data_seeds_of(b: Build, cfg: CompareConfig) -> tuple[int, ...]:
    return cfg.data_seeds if b.method in HEADLINE or is_dive(b.method) else cfg.data_seeds[:1]


# --------------------------------------------------------------------------- building the models


def activated_share(cfg: CompareConfig) -> float:
    """The FFN share every method activates per token: DIVE's top-k experts of (1 - r) F each."""
    return cfg.top_k * (1 - cfg.prune_ratio)


def method_config(b: Build, cfg: CompareConfig):
    """The build of one method at DIVE's activated FFN width, k (1 - r) F."""
    from dive_ds.build.expert_plan import ReconstructConfig

    a = activated_share(cfg)
    if b.method in DENSE_METHODS:
        method = "flap-adaptive" if b.method == "flap-adaptive" else "flap"
        return ReconstructConfig(num_experts=1, top_k=1, prune_ratio=1 - a, method=method, seed=b.seed)
    if b.method == "llama-moe":
        # as published: N disjoint experts of F/N, N a of them active, no bias compensation, and the
        # expert-output scale k (gates sum to 1; scaled by k, k equal-gated parts add up like the FFN's);
        # fixed by that argument, not chosen on any evaluated text
        k = int(round(cfg.experts * a))
        return ReconstructConfig(num_experts=cfg.experts, top_k=k, prune_ratio=1 - 1 / cfg.experts,
                                 method="llama-moe", seed=b.seed, bias_compensation=False,
                                 output_scale=float(k))  # fmt: skip
    if b.method == CLUSTERS:
        return ReconstructConfig(num_experts=cfg.experts, top_k=cfg.top_k, prune_ratio=cfg.prune_ratio,
                                 method="dive", seed=b.seed, groups_from="clusters")  # fmt: skip
    shared = shared_ratio_of(b.method)
    if shared is not None:
        return ReconstructConfig(num_experts=cfg.experts, top_k=cfg.top_k, prune_ratio=cfg.prune_ratio,
                                 method="dive", seed=b.seed, shared_ratio=shared)  # fmt: skip
    return ReconstructConfig(num_experts=cfg.experts, top_k=cfg.top_k, prune_ratio=cfg.prune_ratio,
                             method=b.method, seed=b.seed)  # fmt: skip


def quick(cfg: CompareConfig) -> CompareConfig:
    return replace(cfg, **(QUICK | ({"lambada": None} if cfg.lambada is None else {})))
