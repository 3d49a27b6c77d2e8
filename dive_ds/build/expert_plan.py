"""Statistics + groups -> which channels each expert keeps (an `ExpertPlan`): pure functions.

`ReconstructConfig` says how experts are cut from the dense FFN (method, width, score, router init);
`plan_experts` turns calibration statistics (and mined groups) into the plan that
dive_ds.build.moe_writer then streams into a MoE checkpoint.

Legend: E experts, L layers, K kept channels per expert, F dense FFN width, H hidden, D domains.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dive_ds.build import affinity
from dive_ds.choices import METHOD_ALIASES, METHODS, PRESETS, ROUTER_INITS  # noqa: F401 (re-exported)
from dive_ds.stats import (
    ChannelStats,
    adaptive_widths,
    channel_scores,
    kept_channels,
    llama_moe_partition,
    mean_var,
    n_keep,
    random_channel_sets,
)

ONE_EXPERT_METHODS = ("flap", "flap-adaptive")


@dataclass(frozen=True)
class ReconstructConfig:
    """How experts are cut from the dense FFN and how the MoE is assembled."""

    num_experts: int = 8
    """N experts per layer (one per domain group)."""
    top_k: int = 1
    """Experts per token at inference."""
    prune_ratio: float = 0.5
    """r: fraction of FFN channels each expert drops (expert width = round(F * (1 - r))); llama-moe needs
    r = 1 - 1/N (width F // N); flap-adaptive keeps L * round(F * (1 - r)) channels over all layers."""
    score: str = "wifv"
    """Channel importance: wifv (default), ifv or wifn."""
    bias_compensation: bool = True
    """FLAP bias b = W_down[:, removed] @ mean[removed] on each expert's output."""
    output_scale: float = 1.0
    """Every expert's output (down projection and bias) multiplied by this: LLaMA-MoE's expert-output
    scale (k for k disjoint experts whose gates sum to 1, so that they add up as the FFN's parts do)."""
    router_init: str = "random"
    """random: seeded N(0, router_init_std) (the paper); centroid: from the groups' mean MLP inputs;
    fit: fitted from the dense model afterwards (dive_ds.build.fit_router; the plan holds the random init)."""
    router_init_std: float = 0.02
    """Standard deviation of the random router init."""
    seed: int = 42
    """Seed for the router init and for the random baselines."""
    shared_ratio: float = 0.0
    """s: fraction of the dense FFN's channels in an always-on shared expert (the highest pooled scores); each
    routed expert then keeps round(F (1 - r)) - round(F s) of the other channels, so a top-1 token still
    activates round(F (1 - r)) channels. 0: no shared expert (the paper's DIVE). dive and nomining only."""
    groups_from: str = "domains"
    """domains: experts from domain groups (mined or given); clusters: expert c of layer l from that layer's
    token cluster c (`calibrate --token-clusters N`, N = the number of experts; dive only)."""
    method: str = "dive"
    """dive | llama-moe (LLaMA-MoE's disjoint random split into N experts of F/N) | random-halves (N random
    sets of round(F * (1 - r)) channels: disjoint when they fit, else independent; "random-split" is its
    deprecated name) | upcycle (N dense copies) | nomining (random domain groups) | flap (1 expert, uniform
    widths) | flap-adaptive (1 expert, FLAP's adaptive per-layer widths)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        object.__setattr__(self, "method", METHOD_ALIASES.get(self.method, self.method))
        if self.num_experts < 1:
            raise ValueError(f"--experts must be >= 1 (got {self.num_experts})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"--top-k {self.top_k} must be between 1 and --experts {self.num_experts}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(
                f"--prune-ratio must be in [0, 1) (got {self.prune_ratio}); e.g. 0.5 keeps half the FFN"
            )
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"unknown router init {self.router_init!r}; choose one of {ROUTER_INITS}")
        if not (math.isfinite(self.output_scale) and self.output_scale > 0):
            raise ValueError(f"--output-scale {self.output_scale}: use a finite number > 0")
        if self.score not in ("wifv", "ifv", "wifn"):
            raise ValueError(f"unknown score {self.score!r}; choose wifv, ifv or wifn")
        if self.method in ONE_EXPERT_METHODS and (self.num_experts, self.top_k) != (1, 1):
            raise ValueError(f"method {self.method} builds one dense pruned FFN: use --experts 1 --top-k 1")
        if self.shared_ratio:
            if self.top_k != 1:  # k routed experts + 1 shared would activate k (1 - r) - (k - 1) s of the FFN
                raise ValueError(
                    "--shared-ratio works with --top-k 1 (the activated width stays round(F (1 - r)))"
                )
            if self.method not in ("dive", "nomining"):
                raise ValueError(f"--shared-ratio is for methods dive and nomining, not {self.method}")
            if not 0.0 < self.shared_ratio < 1.0 - self.prune_ratio:
                raise ValueError(
                    f"--shared-ratio {self.shared_ratio} must be in [0, 1 - r = {1 - self.prune_ratio:g}): the "
                    "shared expert takes that share of the channels an expert keeps, the routed experts the rest"
                )
        if self.groups_from not in ("domains", "clusters"):
            raise ValueError(f"--groups-from {self.groups_from!r}: use domains or clusters")
        if self.groups_from == "clusters" and self.method != "dive":
            raise ValueError(
                f"--groups-from clusters cuts DIVE's experts from token clusters: not for {self.method}"
            )
        split = 1 - 1 / self.num_experts
        if self.method == "llama-moe" and not math.isclose(self.prune_ratio, split, abs_tol=1e-3):
            raise ValueError(
                f"method llama-moe splits the FFN into {self.num_experts} disjoint experts of F/{self.num_experts}: "
                f"use --prune-ratio {split!r} (= 1 - 1/{self.num_experts}), not {self.prune_ratio}"
            )


@dataclass
class ExpertPlan:
    kept_L: list[torch.Tensor]
    """Per layer, [E, K_l] kept channel indices (ascending) of every expert; K_l is the same for every
    layer except with flap-adaptive."""
    mean_ELF: torch.Tensor | None
    """[E, L, F] float64 channel means behind each expert's compensation bias (None: no bias);
    the bias W_down[:, removed] @ mean[removed] is formed while streaming, where W_down is."""
    router_ELH: torch.Tensor
    """[E, L, H] float32 initial router weights."""
    groups: dict[str, list[str]]
    """expert name -> domains whose statistics built it (empty for random baselines)."""
    output_scale: float = 1.0
    """ReconstructConfig.output_scale, applied to each expert's down projection and bias when cut."""
    shared_L: list[torch.Tensor] | None = None
    """Per layer, [S] channels of the always-on shared expert (ascending), disjoint from every routed
    expert's; each routed expert's bias compensates what neither it nor the shared expert keeps."""

    @property
    def widths_L(self) -> list[int]:
        """The expert width of every layer."""
        return [k.shape[-1] for k in self.kept_L]

    @property
    def kept_ELK(self) -> torch.Tensor:
        """[E, L, K] kept channels of a plan with one width (ValueError for per-layer widths: use kept_L)."""
        if len(set(self.widths_L)) != 1:
            raise ValueError(f"this plan has per-layer expert widths {self.widths_L}; read plan.kept_L")
        return torch.stack(self.kept_L, dim=1)


def _group_indices(groups: dict[str, list[str]], domains: list[str]) -> list[list[int]]:
    pos = {d: i for i, d in enumerate(domains)}
    return [[pos[d] for d in members] for members in groups.values()]


def _router_init(
    stats: ChannelStats, idx_per_expert: list[list[int]], cfg: ReconstructConfig
) -> torch.Tensor:
    n_layers, hidden = stats.mlp_in_sum_DLH.shape[1:]
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.router_init in ("random", "fit") or not any(idx_per_expert):
        return torch.randn(cfg.num_experts, n_layers, hidden, generator=g) * cfg.router_init_std
    # centroid: logits = x . (mu_e - mu_all) / |mu_e - mu_all|, scaled so that a token at the
    # centroid of its group leads the others by a few units before any training
    counts = stats.count_D.reshape(
        stats.count_D.shape[0], -1, 1
    )  # [D, 1, 1], or [C, L, 1] for token clusters
    mu_all = stats.mlp_in_sum_DLH.sum(0) / counts.sum(0)
    w = torch.empty(cfg.num_experts, n_layers, hidden, dtype=torch.float64)
    for e, idx in enumerate(idx_per_expert):
        ix = torch.as_tensor(idx)
        mu_e = stats.mlp_in_sum_DLH[ix].sum(0) / counts[ix].sum(0)
        w[e] = mu_e - mu_all
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = 8.0 / mu_all.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return (w * scale).to(torch.float32)


def plan_experts(
    stats: ChannelStats, domains: list[str], groups: dict[str, list[str]] | None, cfg: ReconstructConfig
) -> ExpertPlan:
    """Which channels each expert keeps, per layer, and its bias (pure function of statistics).

    Random baselines (llama-moe, random-halves, upcycle) compensate every expert with the pooled mean of
    the channels it lacks, as the experts of every method are built: W_down[:, removed] @ mean[removed]."""
    n_layers, ffn = stats.sum_DLF.shape[1:]
    keep = n_keep(ffn, cfg.prune_ratio)
    pooled = stats.merged(list(range(len(domains))))
    pooled_mean, _ = mean_var(pooled.count_D, pooled.sum_DLF, pooled.sumsq_DLF)  # [1, L, F]
    g = torch.Generator().manual_seed(cfg.seed)
    idx = [[] for _ in range(cfg.num_experts)]
    if cfg.method in ONE_EXPERT_METHODS:
        groups = {"flap_all": list(domains)}
    elif cfg.method == "nomining":
        perm = torch.randperm(len(domains), generator=g).tolist()
        groups = {
            f"random_{e}": [domains[i] for i in perm[e :: cfg.num_experts]] for e in range(cfg.num_experts)
        }
    mean_ELF = pooled_mean.expand(cfg.num_experts, -1, -1)
    shared_LS = None  # the shared expert's channels (dive / nomining with --shared-ratio)
    if cfg.method == "flap-adaptive":  # FLAP's "AL": the uniform total, each layer's width what it won
        idx = [list(range(len(domains)))]
        _, kept = adaptive_widths(channel_scores(pooled, cfg.score)[0], n_layers * keep)
        kept_L = [k.unsqueeze(0) for k in kept]
    elif cfg.method in ("dive", "nomining", "flap"):
        if groups is None or len(groups) != cfg.num_experts:
            raise ValueError(
                f"{cfg.num_experts} experts need {cfg.num_experts} groups "
                f"(got {0 if groups is None else len(groups)}); mine them or pass --groups FILE"
            )
        idx = _group_indices(groups, domains)
        if cfg.shared_ratio:  # the pooled statistics' best channels, then each group's best of the rest
            n_shared = n_keep(ffn, 1.0 - cfg.shared_ratio)
            shared_LS = kept_channels(channel_scores(pooled, cfg.score)[0], n_shared)
        kept, means = [], []
        for members in idx:
            st = stats.merged(members)
            mean, _ = mean_var(st.count_D, st.sum_DLF, st.sumsq_DLF)
            scores_LF = channel_scores(st, cfg.score)[0]
            if shared_LS is not None:
                scores_LF = scores_LF.scatter(1, shared_LS, float("-inf"))
            kept.append(kept_channels(scores_LF, keep - (0 if shared_LS is None else shared_LS.shape[1])))
            means.append(mean[0])
        kept_L, mean_ELF = list(torch.stack(kept).unbind(1)), torch.stack(means)
    elif cfg.method == "llama-moe":  # F // N channels each; F % N channels per layer in no expert
        kept_L = list(llama_moe_partition(ffn, cfg.num_experts, n_layers, g).unbind(1))
        keep = kept_L[0].shape[-1]
        groups = {f"split_{e}": [] for e in range(cfg.num_experts)}
    elif cfg.method == "random-halves":
        kept_L = list(random_channel_sets(ffn, cfg.num_experts, n_layers, keep, g).unbind(1))
        groups = {f"random_{e}": [] for e in range(cfg.num_experts)}
    else:  # upcycle: N copies of the whole FFN
        if cfg.prune_ratio != 0.0:
            raise ValueError("method upcycle copies the whole FFN: use --prune-ratio 0")
        kept_L = [torch.arange(ffn).expand(cfg.num_experts, ffn).clone() for _ in range(n_layers)]
        groups = {f"copy_{e}": [] for e in range(cfg.num_experts)}
    means = mean_ELF if cfg.bias_compensation and keep < ffn else None
    shared_L = None if shared_LS is None else list(shared_LS.unbind(0))
    return ExpertPlan(kept_L, means, _router_init(stats, idx, cfg), groups, cfg.output_scale, shared_L)


def reconstruct_config(
    preset: str | None = None,
    experts: int | None = None,
    top_k: int | None = None,
    prune_ratio: float | None = None,
    method: str = "dive",
    score: str = "wifv",
    bias_compensation: bool = True,
    router_init: str = "random",
    seed: int = 42,
    shared_ratio: float = 0.0,
    groups_from: str = "domains",
):
    """`dive-ds reconstruct`'s settings: the preset (or N=8, k=1, r=0.5), then the given values, then the method's."""

    base = dict(PRESETS[preset]) if preset else {"num_experts": 8, "top_k": 1, "prune_ratio": 0.5}
    for value, key in ((experts, "num_experts"), (top_k, "top_k"), (prune_ratio, "prune_ratio")):
        if value is not None:
            base[key] = value
    if method in ("flap", "flap-adaptive"):
        base.update(num_experts=1, top_k=1)
    if method == "llama-moe" and prune_ratio is None:  # N disjoint experts of F/N channels
        base["prune_ratio"] = 1 - 1 / base["num_experts"]
    if method == "upcycle":
        base["prune_ratio"] = 0.0
    return ReconstructConfig(
        score=score,
        bias_compensation=bias_compensation,
        router_init=router_init,
        seed=seed,
        method=method,
        shared_ratio=shared_ratio,
        groups_from=groups_from,
        **base,
    )


def cluster_groups(clusters: ChannelStats, num_experts: int) -> tuple[list[str], dict[str, list[str]]]:
    """(names, groups) that make plan_experts cut expert c of every layer from that layer's token cluster c."""
    n = clusters.count_D.shape[0]
    if n != num_experts:
        raise ValueError(f"the calibration has {n} token clusters per layer but --experts {num_experts}: make them "
                         f"equal (calibrate --token-clusters {num_experts})")  # fmt: skip
    counts_CL = clusters.count_D
    c, layer = divmod(int(counts_CL.argmin()), counts_CL.shape[1])
    if counts_CL[c, layer] < 2:  # no variance to score its channels by, no mean to compensate with
        raise ValueError(f"token cluster {c} of layer {layer} holds {int(counts_CL[c, layer])} token(s): its expert "
                         "has nothing to be cut from; calibrate with fewer --token-clusters or more windows")  # fmt: skip
    names = [f"cluster{c}" for c in range(n)]
    return names, {f"cluster_{c}": [name] for c, name in enumerate(names)}


def load_groups(path: str | Path, domains: list[str]) -> dict[str, list[str]]:
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"groups file {path} does not exist; pass a JSON file {{group: [domains]}} or run `dive-ds mine`"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"groups file {path} is not valid JSON: {e}") from e
    groups = raw.get("groups", raw) if isinstance(raw, dict) else None
    if not isinstance(groups, dict):
        raise ValueError(f"groups file {path} must map group name -> list of domains")
    affinity.labels_from_groups(groups, domains)  # validates: unknown / duplicate / missing domains
    return {str(k): list(v) for k, v in groups.items()}
