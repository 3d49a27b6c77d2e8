"""`dive-ds compare`: DIVE against its baselines at an equal budget, from ONE calibration.

Builds, at the same activated FFN width: DIVE (mined groups), DIVE without mining (random domain
groups), LLaMA-MoE's neuron-independent split (N disjoint experts of F/N channels, top-N/2), the
independent random halves, FLAP with uniform widths and FLAP with its adaptive structure search.
The seeded baselines (nomining, llama-moe, random-halves) are built once per `--grouping-seeds`.
Every MoE gets the router treatments asked for: "fitted" (dive_ds.build.fit_router, then the experts stage
for the whole budget) and/or "random" (the paper's recipe: seeded router, a router stage, then the
experts stage). FLAP gets the experts stage on its one expert; `flap-eqtrain` is uniform FLAP with
its LoRA rank raised until it trains at least as many parameters as DIVE. Every run goes through the
same DeepSpeed trainer with the same batch, lr and steps, once per `--data-seeds`.

Text: every domain is split once by the calibration's seed (dive_ds.data.split) into calibration,
selection, training and evaluation sets. Calibration and router fitting read the calibration set,
mining the selection set, training the training set; every model is scored only on windows spread
over the evaluation set (seen domains), and on the evaluation set of `--eval-domains` (unseen:
never calibrated, selected on or trained on). Scores are per window, so every ratio between two
methods gets a paired bootstrap interval on identical windows (dive_ds.eval.paired).
Writes compare.json, compare.md and ppl_vs_tokens.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dive_ds.build.compare_plan import CompareConfig, builds, method_config, run_names, uses_groups
from dive_ds.build.compare_score import (
    eqtrain_rank,
    eval_sets,
    lambada_items,
    params_of,
    score_all,
    widths_of,
)
from dive_ds.io.atomic import link_or_copy
from dive_ds.io.fingerprint import git_rev

REPO = Path(__file__).resolve().parents[2]
RUN_SET = ("methods", "grouping_seeds", "data_seeds")


def _same(a: dict, b: dict) -> bool:
    drop = {"progress"}
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _reusable(src: Path, rc_dict: dict, fit: dict | None, calib: Path) -> bool:
    """Whether `src` (a model folder of an earlier compare) is exactly what this one would build: the same
    settings, from this calibration as it is now (its fingerprint, not only its path: a calibration
    replaced at the same path makes every model built from it stale)."""
    from dive_ds.io.fingerprint import folder_fingerprint

    try:
        now = folder_fingerprint(calib)
        meta = json.loads((src / "dive_experts.json").read_text())
        if meta["reconstruction"] != rc_dict or meta.get("calibration_fingerprint") != now:
            return False
        if fit is not None:
            rep = json.loads((src / "router_fit.json").read_text())
            return _same(rep["config"], fit) and rep.get("calibration_fingerprint") == now
        return not (src / "router_fit.json").exists()
    except (OSError, KeyError, ValueError):
        return False


def _link_model(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a finished model folder under a temporary name, then rename it into place."""
    from dive_ds.io.atomic import staged_dir

    with staged_dir(dst) as tmp:
        for path in sorted(src.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                (tmp / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(path, tmp / path.relative_to(src))


def _build_models(
    cal, groups_file: Path, out: Path, cfg: CompareConfig, reuse: Path | None = None
) -> dict[str, Path]:
    from dive_ds.build.fit_router import run_fit_router
    from dive_ds.build.reconstruct import run_reconstruct

    models: dict[str, Path] = {}
    for b in builds(cfg):
        if b.method == "flap-eqtrain":  # the same model as flap; only its LoRA rank differs
            models[b.name] = out / "models" / "flap"
            if "flap" in models:
                continue
        rc = method_config(b, cfg)
        stem = "flap" if b.method == "flap-eqtrain" else b.name.removesuffix(f"-{b.treatment}")
        base = out / "models" / (stem if b.treatment == "-" else f"{stem}-random")
        old = None if reuse is None else reuse / "models" / base.name
        if not (base / "config.json").exists():
            if old is not None and _reusable(old, asdict(rc), None, cal.path):
                print(f"[compare] reusing {old}", flush=True)
                _link_model(old, base)
            else:
                run_reconstruct(cal.path, groups_file if uses_groups(b.method) else None, base, rc)
        path = base
        if b.treatment == "fitted":
            path = out / "models" / b.name
            old = None if reuse is None else reuse / "models" / path.name
            if not (path / "config.json").exists():
                if old is not None and _reusable(old, asdict(rc), asdict(cfg.fit), cal.path):
                    print(f"[compare] reusing {old}", flush=True)
                    _link_model(old, path)
                else:
                    run_fit_router(base, cal.path, path, cfg.fit)
        models[b.name] = path
    return models


# --------------------------------------------------------------------------- training and scoring


def train_run(name: str, model: Path, router: int, out: Path, registry: str, cfg: CompareConfig,
              extra: dict | None = None) -> Path:  # fmt: skip
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
        "eval.windows_per_domain": cfg.curve_windows,
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


def curve(run_dir: Path, batch: int, seq_len: int) -> tuple[list[dict], float | None, int | None]:
    """Eval points [(tokens, token-weighted ppl, mean ppl, per-domain ppl)] across stages, the median
    training tokens/s, and the experts stage's trainable parameter count."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    points, rates, first, seen, trainable = [], [], [], set(), None
    for r in rows:
        if r.get("event") == "eval":
            key = r["global_step"]
            if key in seen:  # the start of one stage is the end of the one before
                continue
            seen.add(key)
            points.append({"tokens": key * batch * seq_len, "ppl_tokens": float(np.exp(r["loss"])),
                           "ppl_mean": r["ppl_mean"], "ppl": r["ppl"]})  # fmt: skip
        elif r.get("event") == "stage_start" and r.get("stage") == "experts":
            trainable = int(r["trainable"]["trainable"])
        elif "tokens_per_s" in r:  # the first step of a stage pays warm-up: left out when there are others
            (rates if r.get("step", 0) > 1 else first).append(r["tokens_per_s"])
    rates = rates or first
    return points, (float(np.median(rates)) if rates else None), trainable


# --------------------------------------------------------------------------- the command


def run_compare(
    calib_dir: str | Path,
    groups_file: str | Path,
    out: str | Path,
    cfg: CompareConfig = CompareConfig(),
    eval_domains: str | None = None,
    reuse: str | Path | None = None,
    command: list[str] | None = None,
) -> dict:
    from dive_ds.build.compare_report import finish, plot_curves, write_report
    from dive_ds.build.expert_plan import load_groups
    from dive_ds.data.split import SplitConfig
    from dive_ds.io.atomic import write_json
    from dive_ds.io.calibration import load_calibration
    from dive_ds.io.fingerprint import folder_fingerprint

    out = Path(out)
    cal = load_calibration(calib_dir)
    load_groups(groups_file, cal.domains)  # validates before any heavy work
    registry = cal.manifest["identity"]["registry"]
    split_raw = cal.manifest["identity"].get("sampler", {}).get("split")
    if split_raw is None:
        raise ValueError(
            f"{cal.path} was calibrated before the four-way split (no sampler.split in its manifest): its "
            "windows may overlap the evaluation text; run `dive-ds calibrate` again"
        )
    split = SplitConfig(**split_raw)
    if eval_domains:
        from dive_ds.data.registry import load_registry

        overlap = set(load_registry(eval_domains).domains) & set(cal.domains)
        if overlap:
            raise ValueError(
                f"--eval-domains names calibrated domains ({sorted(overlap)[0]}); pass domains never calibrated on"
            )
    # What every run's numbers depend on; the set of runs (methods, grouping and data seeds) is not part of
    # it: a finished comparison takes more methods or seeds and runs only what is new.
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_SET} | {
        "treatments": sorted(cfg.treatments)
    }
    identity = {"calibration": str(cal.path.resolve()), "calibration_fingerprint": folder_fingerprint(cal.path),
                "groups": str(Path(groups_file).resolve()), "groups_digest": hashlib.sha256(Path(groups_file).read_bytes()).hexdigest()[:16],
                "config": settings, "eval_domains": eval_domains}  # fmt: skip
    identity = json.loads(json.dumps(identity, default=str))
    ident_file = out / "compare_identity.json"
    if out.exists() and any(out.iterdir()):
        old = json.loads(ident_file.read_text()) if ident_file.exists() else None
        if old != identity:
            raise ValueError(f"--out {out} holds another run (or other files); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(ident_file, identity)
    t_all = time.time()

    print("[compare] building the models (reconstruct + router fitting)", flush=True)
    t0 = time.time()
    models = _build_models(cal, Path(groups_file), out, cfg, Path(reuse) if reuse else None)
    build_s = time.time() - t0
    any_model = next(iter(models.values()))
    windows, split_ids = {}, {}
    windows["seen"], split_ids["seen"] = eval_sets(registry, any_model, cfg.eval_windows, cfg.seq_len, split)
    if eval_domains:
        windows["unseen"], split_ids["unseen"] = eval_sets(eval_domains, any_model, cfg.unseen_windows,
                                                           cfg.seq_len, split)  # fmt: skip
    items = lambada_items(cfg.lambada, split, cal.domains)
    if items:
        split_ids["lambada"] = {
            "items": len(items),
            "span_ids": sorted({i for it in items for i in it["span_ids"]}),
        }
    write_json(out / "eval_split.json", {"split": asdict(split), "ids": split_ids})
    shapes = {k: {n: list(w.shape) for n, w in v.items()} for k, v in windows.items()}
    clusters = {k: {d: rec["clusters"] for d, rec in split_ids[k].items()} for k in windows}
    if items:  # items of one evaluation segment are one cluster
        first = {}
        clusters["lambada"] = {"lambada": [first.setdefault(it["span_ids"][0], len(first)) for it in items]}
    results: dict = {"runs": {}, "models": {}, "windows": shapes, "split": asdict(split), "clusters": clusters,
                     "command": command, "commit": git_rev()}  # fmt: skip
    old = json.loads((out / "compare.json").read_text()) if (out / "compare.json").exists() else {}
    if old.get("windows") == shapes:  # same identity (checked above) and same windows: their numbers stand
        results["runs"], results["models"] = old.get("runs", {}), old.get("models", {})
        for name in results["runs"]:
            print(f"[compare] {name}: kept from the earlier pass of this comparison", flush=True)
    names = run_names(cfg)

    def write() -> (
        None
    ):  # after every run (complete: false until the last), so a long comparison shows as it goes
        results.update(complete={n for n, _, _ in names} <= set(results["runs"]), config=asdict(cfg), calibration=str(cal.path),
                       eval_domains=eval_domains, build_seconds=round(build_s, 1),
                       total_seconds=round(time.time() - t_all, 1))  # fmt: skip
        finish(results, cfg.bootstrap)
        write_json(out / "compare.json", results)
        write_report(results, out / "compare.md")
        plot_curves(results, out / "ppl_vs_tokens.png")

    for b in builds(cfg):  # before training: once per model (the data seed does not change it)
        if b.name in results["models"]:
            continue
        if b.method == "flap-eqtrain" and "flap" in results["models"]:  # the very same model as flap
            results["models"][b.name] = results["models"]["flap"] | {"method": b.method}
            continue
        print(f"[compare] scoring {b.name} before training", flush=True)
        oracle = b.treatment == "random"  # its fitted twin has the very same experts
        before = score_all(models[b.name], windows, items, oracle=oracle)
        results["models"][b.name] = {"method": b.method, "treatment": b.treatment, "grouping_seed": b.seed,
                                     "path": str(models[b.name]), "params": params_of(models[b.name]),
                                     "widths": widths_of(models[b.name]), "commit": results["commit"],
                                     "before": before}  # fmt: skip
        write()
    for name, b, dseed in names:
        if name in results["runs"]:
            continue
        extra = {"data.seed": dseed, "data.domains": "[" + ",".join(cal.domains) + "]"}  # the calibrated ones
        extra |= {f"data.split.{k}": v for k, v in asdict(split).items()}
        if b.method == "flap-eqtrain":
            dive = [r for r in results["runs"].values() if r["model"] == "dive-fitted" and r.get("trainable")]
            if not dive:
                raise ValueError("flap-eqtrain needs a finished dive-fitted run first (its trainable count)")
            rank = eqtrain_rank(models[b.name], dive[0]["trainable"])
            # the same alpha / r as the default (16 / 8): a larger rank must not lower the adapter's scale
            extra |= {"stages.experts.lora_r": rank, "stages.experts.lora_alpha": 2 * rank}
        router = cfg.router_steps if b.treatment == "random" else 0
        run_dir = train_run(name, models[b.name], router, out, registry, cfg, extra)
        points, tok_s, trainable = curve(run_dir, cfg.batch, cfg.seq_len)
        after = score_all(run_dir / "model", windows, items)
        results["runs"][name] = {"model": b.name, "method": b.method, "treatment": b.treatment, "data_seed": dseed,
                                 "grouping_seed": b.seed, "after": after, "curve": points, "trainable": trainable,
                                 "lora_r": extra.get("stages.experts.lora_r"), "train_tokens_per_s": tok_s,
                                 "commit": results["commit"],
                                 "train_tokens": cfg.steps * cfg.batch * cfg.seq_len}  # fmt: skip
        write()
    write()
    print((out / "compare.md").read_text())
    return results
