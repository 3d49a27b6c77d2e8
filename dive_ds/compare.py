"""`dive-ds compare`: DIVE against its baselines at an equal budget, from ONE calibration.

Builds, at the same activated FFN width: DIVE (mined groups), DIVE without mining (random domain
groups), the random neuron split (LLaMA-MoE) and FLAP dense pruning. Every MoE gets both router
treatments: "fitted" (dive_ds.routerfit, then the experts stage for the whole budget) and "random"
(the paper's recipe: seeded N(0, 0.02) router, a router stage, then the experts stage for the rest of
the budget). FLAP gets the experts stage (LoRA + norms on its one expert) for the whole budget.
Every run goes through the same DeepSpeed trainer with the same batch, lr and steps, and every model
is evaluated on the same windows:

- seen: the training registry's held-out documents (the trainer's eval windows; never trained on),
  at every eval point of the training curve;
- calib: the calibration's held-out windows (never calibrated or fitted on), before training;
- unseen: `--eval-domains REGISTRY`, domains never calibrated or trained on, before and after.

Nothing is chosen on any of these windows. Writes compare.json, compare.md and ppl_vs_tokens.png.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dive_ds.routerfit import RouterFitConfig

MOE_METHODS = ("dive", "nomining", "random-split")
REPO = Path(__file__).resolve().parents[1]


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
    eval_windows: int = 4
    """Held-out windows per seen domain (trainer's held-out documents)."""
    unseen_windows: int = 8
    """Windows per --eval-domains domain."""
    methods: tuple[str, ...] = ("dive", "nomining", "random-split", "flap")
    treatments: tuple[str, ...] = ("fitted", "random")
    seed: int = 42
    fit: RouterFitConfig = field(default_factory=RouterFitConfig)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in (*MOE_METHODS, "flap")]
        if bad:
            raise ValueError(f"--methods {bad[0]!r}: choose from {', '.join((*MOE_METHODS, 'flap'))}")
        bad = [t for t in self.treatments if t not in ("fitted", "random")]
        if bad:
            raise ValueError(f"--treatments {bad[0]!r}: choose fitted and/or random")
        if self.steps < 1 or not 0 <= self.router_steps < self.steps:
            raise ValueError(
                f"--steps {self.steps} --router-steps {self.router_steps}: use steps >= 1 and 0 <= router steps < steps"
            )
        if self.eval_every < 1:
            raise ValueError(f"--eval-every {self.eval_every}: use >= 1")


QUICK = dict(steps=2, router_steps=1, batch=2, eval_every=1, eval_windows=1, unseen_windows=1)
"""`--quick`: the whole command in minutes (tests)."""


def run_names(cfg: CompareConfig) -> list[tuple[str, str, str]]:
    """(run name, method, treatment) of every training run: FLAP first, then treatment by treatment
    (every method's fitted run before any random one), so an interrupted comparison has whole
    columns to compare."""
    runs = [("flap", "flap", "-")] if "flap" in cfg.methods else []
    for t in cfg.treatments:
        runs += [(f"{m}-{t}", m, t) for m in cfg.methods if m != "flap"]
    return runs


# --------------------------------------------------------------------------- steps


def _same(a: dict, b: dict) -> bool:
    drop = {"progress"}
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _reusable(src: Path, rc_dict: dict, fit: dict | None, calib: Path) -> bool:
    """Whether `src` (a model folder of an earlier compare) is exactly what this one would build."""
    try:
        meta = json.loads((src / "dive_experts.json").read_text())
        if meta["reconstruction"] != rc_dict or Path(meta["calibration"]).resolve() != calib.resolve():
            return False
        if fit is not None:
            rep = json.loads((src / "router_fit.json").read_text())
            return _same(rep["config"], fit) and Path(rep["calibration"]).resolve() == calib.resolve()
        return not (src / "router_fit.json").exists()
    except (OSError, KeyError, ValueError):
        return False


def _link_model(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a finished model folder under a temporary name, then rename it into place."""
    import shutil
    import tempfile

    from dive_ds.routerfit import _link_or_copy

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                (tmp / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(path, tmp / path.relative_to(src))
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_models(
    cal, groups_file: Path, out: Path, cfg: CompareConfig, reuse: Path | None = None
) -> dict[str, Path]:
    from dive_ds.reconstruct import ReconstructConfig
    from dive_ds.workflows import run_fit_router, run_reconstruct

    models: dict[str, Path] = {}
    for name, method, treatment in run_names(cfg):
        if method == "flap":
            rc = ReconstructConfig(
                num_experts=1, top_k=1, prune_ratio=cfg.prune_ratio, method="flap", seed=cfg.seed
            )
        else:
            rc = ReconstructConfig(num_experts=cfg.experts, top_k=cfg.top_k, prune_ratio=cfg.prune_ratio,
                                   method=method, seed=cfg.seed)  # fmt: skip
        base = out / "models" / (method if method == "flap" else f"{method}-random")
        old = None if reuse is None else reuse / "models" / base.name
        if not (base / "config.json").exists():
            if old is not None and _reusable(old, asdict(rc), None, cal.path):
                print(f"[compare] reusing {old}", flush=True)
                _link_model(old, base)
            else:
                run_reconstruct(cal.path, groups_file if method == "dive" else None, base, rc)
        path = base
        if treatment == "fitted":
            path = out / "models" / f"{method}-fitted"
            old = None if reuse is None else reuse / "models" / path.name
            if not (path / "config.json").exists():
                if old is not None and _reusable(old, asdict(rc), asdict(cfg.fit), cal.path):
                    print(f"[compare] reusing {old}", flush=True)
                    _link_model(old, path)
                else:
                    run_fit_router(base, cal.path, path, cfg.fit)
        models[name] = path
    return models


def train_run(
    name: str,
    model: Path,
    router: int,
    out: Path,
    registry: str,
    cfg: CompareConfig,
    extra: dict | None = None,
) -> Path:
    """One run of launchers/retrain.py (its own process, as a user runs it): `router` router-stage steps,
    then cfg.steps - router experts-stage steps. Resumes if interrupted; `extra`: more --set overrides."""
    run_dir = out / "train" / name
    experts = cfg.steps - router
    sets = {
        "out_dir": run_dir,
        "model.path": model,
        "data.registry": registry,
        "data.seq_len": cfg.seq_len,
        "train.global_batch_size": cfg.batch,
        "train.seed": cfg.seed,
        "stages.router.enabled": str(router > 0).lower(),
        "stages.router.steps": max(router, 1),
        "stages.router.lr": cfg.lr,
        "stages.experts.steps": experts,
        "stages.experts.lr": cfg.lr,
        "checkpoint.every": 0,
        "checkpoint.exclude_frozen": "true",
        "eval.every": cfg.eval_every,
        "eval.at_start": "true",
        "eval.windows_per_domain": cfg.eval_windows,
        "eval.calib_dir": "null",
        "logging.progress": "false",
    } | (extra or {})
    cmd = [sys.executable, str(REPO / "launchers" / "retrain.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
           "--config", str(REPO / "configs" / "demo_retrain.yaml")]  # fmt: skip
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    print(f"[compare] train {name}: {router} router + {experts} experts steps of {cfg.batch} x {cfg.seq_len} tokens",
          flush=True)  # fmt: skip
    rc = subprocess.run(cmd, env=os.environ.copy()).returncode
    if rc != 0:
        raise RuntimeError(
            f"training run {name} failed (exit {rc}); see its output above, then rerun compare to resume"
        )
    return run_dir


def curve(run_dir: Path, batch: int, seq_len: int) -> tuple[list[dict], float | None]:
    """Eval points [(tokens, ppl_mean, per-domain ppl)] across stages, and the mean training tokens/s."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points, rates, first, seen = [], [], [], set()
    for r in rows:
        if r.get("event") == "eval":
            key = r["global_step"]
            if key in seen:  # the start of one stage is the end of the one before
                continue
            seen.add(key)
            points.append({"tokens": key * batch * seq_len, "ppl_mean": r["ppl_mean"], "ppl": r["ppl"]})
        elif "tokens_per_s" in r:  # the first step of a stage pays warm-up: left out when there are others
            (rates if r.get("step", 0) > 1 else first).append(r["tokens_per_s"])
    rates = rates or first
    return points, (float(np.median(rates)) if rates else None)


def _ppl(model_dir: Path, windows: dict[str, torch.Tensor], oracle: bool = False) -> dict:
    from dive_ds.eval.perplexity import domain_perplexities
    from dive_ds.models.loading import load_causal_lm
    from dive_ds.workflows import oracle_map

    m = load_causal_lm(model_dir, dtype=torch.float32).eval()
    res = {"router": domain_perplexities(m, windows, 4)}
    if oracle:
        mapping = oracle_map(model_dir, list(windows))
        if mapping is not None:
            res["oracle"] = domain_perplexities(m, windows, 4, oracle=mapping)
    for k in list(res):
        res[k + "_mean"] = float(np.mean(list(res[k].values())))
    return res


def seen_windows(registry: str, model_dir: Path, cfg: CompareConfig, holdout_every: int = 10) -> dict:
    """The trainer's own eval windows: the first windows of each domain's held-out documents."""
    from transformers import AutoConfig

    from dive_ds.data.registry import load_registry
    from dive_ds.train.data import heldout_windows, load_tokenizer

    reg = load_registry(registry)
    tok = load_tokenizer(None, model_dir, AutoConfig.from_pretrained(model_dir).vocab_size)
    return {
        d.name: heldout_windows(d, tok, cfg.seq_len, cfg.eval_windows, holdout_every)
        for d in reg.domains.values()
    }


# --------------------------------------------------------------------------- the command


def run_compare(
    calib_dir: str | Path,
    groups_file: str | Path,
    out: str | Path,
    cfg: CompareConfig = CompareConfig(),
    eval_domains: str | None = None,
    reuse: str | Path | None = None,
) -> dict:
    from dive_ds.calibrate import load_calibration
    from dive_ds.workflows import _write_json, load_groups, registry_eval_windows

    out = Path(out)
    cal = load_calibration(calib_dir)
    load_groups(groups_file, cal.domains)  # validates before any heavy work
    registry = cal.manifest["identity"]["registry"]
    settings = asdict(cfg) | {
        "methods": sorted(cfg.methods),
        "treatments": sorted(cfg.treatments),
    }  # order: free
    identity = {"calibration": str(cal.path.resolve()), "groups": str(Path(groups_file).resolve()),
                "config": settings, "eval_domains": eval_domains}  # fmt: skip
    ident_file = out / "compare_identity.json"
    if out.exists() and any(out.iterdir()):
        old = json.loads(ident_file.read_text()) if ident_file.exists() else None
        if old != json.loads(json.dumps(identity, default=str)):
            raise ValueError(f"--out {out} holds another run (or other files); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(ident_file, json.loads(json.dumps(identity, default=str)))
    t_all = time.time()

    print("[compare] building the models (reconstruct + router fitting)", flush=True)
    t0 = time.time()
    models = _build_models(cal, Path(groups_file), out, cfg, Path(reuse) if reuse else None)
    build_s = time.time() - t0
    any_model = next(iter(models.values()))
    windows = {"seen": seen_windows(registry, any_model, cfg)}
    windows["calib"] = dict(cal.eval)  # all of the calibration's held-out windows
    if eval_domains:
        windows["unseen"] = registry_eval_windows(
            eval_domains, any_model, cfg.unseen_windows, cfg.seq_len, cfg.seed
        )
    overlap = set(windows.get("unseen", {})) & set(cal.domains)
    if overlap:
        raise ValueError(
            f"--eval-domains names calibrated domains ({sorted(overlap)[0]}); pass domains never calibrated on"
        )

    results: dict = {
        "runs": {},
        "windows": {k: {n: int(w.numel()) for n, w in v.items()} for k, v in windows.items()},
    }
    done = _finished_runs(out / "compare.json", results["windows"])
    names = run_names(cfg)
    for name, _, _ in names:  # same identity (checked above) and same windows: their numbers stand
        if name in done:
            print(f"[compare] {name}: kept from the earlier pass of this comparison", flush=True)
            results["runs"][name] = done[name]

    def write() -> (
        None
    ):  # after every run (complete: false until the last), so a long comparison shows as it goes
        results.update(
            complete=len(results["runs"]) == len(names), config=asdict(cfg), calibration=str(cal.path),
            eval_domains=eval_domains, build_seconds=round(build_s, 1),
            total_seconds=round(time.time() - t_all, 1), ratios=ratios(results["runs"]),
        )  # fmt: skip
        _write_json(out / "compare.json", results)
        (out / "compare.md").write_text(markdown(results))
        plot_curves(results, out / "ppl_vs_tokens.png")

    if done:
        write()
    for name, method, treatment in names:
        if name in done:
            continue
        print(f"[compare] evaluating {name} before training", flush=True)
        # oracle routing only with the random router: its fitted twin has the very same experts
        oracle = treatment == "random"
        before = {k: _ppl(models[name], w, oracle=(k != "unseen" and oracle)) for k, w in windows.items()}
        router = cfg.router_steps if treatment == "random" else 0
        run_dir = train_run(name, models[name], router, out, registry, cfg)
        points, tok_s = curve(run_dir, cfg.batch, cfg.seq_len)
        final = run_dir / "model"
        after = {k: _ppl(final, w) for k, w in windows.items() if k != "calib"}
        results["runs"][name] = {"method": method, "treatment": treatment, "model": str(models[name]),
                                 "before": before, "after": after, "curve": points, "train_tokens_per_s": tok_s,
                                 "train_tokens": cfg.steps * cfg.batch * cfg.seq_len}  # fmt: skip
        write()
    print((out / "compare.md").read_text())
    return results


def _finished_runs(path: Path, windows: dict) -> dict:
    """Runs an interrupted pass of this very comparison finished (its windows must match)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    return old.get("runs", {}) if old.get("windows") == windows else {}


def ratios(runs: dict) -> dict:
    """Mean-ppl ratios of the comparisons the method is judged by, before and after training."""
    out = {}
    for when in ("before", "after"):
        for split in ("seen", "calib", "unseen"):
            mean = {n: r[when][split]["router_mean"] for n, r in runs.items() if split in r.get(when, {})}
            if "flap" in mean:
                for n, v in mean.items():
                    if n != "flap":
                        out[f"{when}/{split}/{n}_vs_flap"] = round(v / mean["flap"], 4)
            if "dive-fitted" in mean and "random-split-fitted" in mean:
                out[f"{when}/{split}/dive-fitted_vs_random-split-fitted"] = round(
                    mean["dive-fitted"] / mean["random-split-fitted"], 4
                )
    return out


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else (f"{x:.1f}" if x < 1000 else f"{x:.3g}")


def markdown(results: dict) -> str:
    runs = results["runs"]
    cfg = results["config"]
    toks = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    lines = [f"# Equal-budget comparison ({toks} training tokens per method)\n"]
    if not results.get("complete", True):
        lines.append(f"(in progress: {len(runs)} of the runs done)\n")
    for when, title in (("before", "before any training (0 tokens)"), ("after", f"after {toks} tokens")):
        for split in ("seen", "calib", "unseen"):
            first = next(iter(runs.values()))
            if split not in first[when]:
                continue
            domains = list(first[when][split]["router"])
            lines.append(f"\n## {split} domains, {title}: held-out perplexity\n")
            lines.append("| run | routing | " + " | ".join(domains) + " | mean |")
            lines.append("|---" * (len(domains) + 3) + "|")
            for name, r in runs.items():
                res = r[when][split]
                for key in ("router", "oracle"):
                    if key in res:
                        row = " | ".join(_fmt(res[key][d]) for d in domains)
                        lines.append(f"| {name} | {key} | {row} | {_fmt(res[key + '_mean'])} |")
    lines.append("\n## training speed (same trainer, same batch)\n")
    lines.append("| run | median tokens/s |")
    lines.append("|---|---|")
    for name, r in runs.items():
        rate = r["train_tokens_per_s"]
        lines.append(f"| {name} | {'-' if rate is None else f'{rate:.0f}'} |")
    lines.append("\n## ratios of mean perplexity\n")
    lines += [f"- {k}: {v}" for k, v in results["ratios"].items()]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["runs"].items():
        pts = r["curve"]
        if pts:
            ax.plot([p["tokens"] for p in pts], [p["ppl_mean"] for p in pts], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("mean held-out perplexity (seen domains)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("equal-budget retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick(cfg: CompareConfig) -> CompareConfig:
    return replace(cfg, **QUICK)
