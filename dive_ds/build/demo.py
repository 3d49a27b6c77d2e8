"""`make demo`: the whole recipe on the embedded default, on a laptop.

calibrate (one pass, with each layer's token clusters) -> mine (D x D pruned evaluations + fast affinity) ->
reconstruct (DIVE, the token-cluster MoE and the baselines, same code path) -> fit the recommended MoE's
routers -> evaluate -> retrain the fitted MoE (experts stage), then one table. The recommended MoE is cut
from token clusters (docs/beyond.md: better than DIVE's domain groups on seen and unseen text, two training
seeds); `--groups-from domains` makes it DIVE's. Sample counts are far below the reference recipe
(1024 x 256 per domain) so it fits a 2-core machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dive_ds.argtypes import error_message
from dive_ds.build.calibrate import calibrate
from dive_ds.build.expert_plan import reconstruct_config
from dive_ds.build.mine import mine
from dive_ds.io.atomic import write_json, write_text


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def run_demo(a) -> dict:
    from dive_ds.build.evaluate import markdown_table
    from dive_ds.build.fit_router import run_fit_router
    from dive_ds.build.reconstruct import run_reconstruct
    from dive_ds.build.router_config import RouterFitConfig
    from dive_ds.io.calibration import load_calibration
    from dive_ds.io.loading import resolve_model

    out = Path(a.out)
    t_all = time.time()
    pick = "clusters" if a.groups_from == "clusters" else "dive"  # the MoE that is fitted and retrained
    print(
        f"DIVE demo: SmolLM2-135M-Instruct, built-in demo pack, {a.samples_per_domain} x {a.seq_len} calibration "
        f"tokens per domain (the reference recipe uses 1024 x 256; smaller here so the demo fits a 2-core machine), "
        f"N={a.experts} experts, top-{a.top_k}, r={a.prune_ratio}"
    )
    build_dtype, score_dtype = _precision(a.dtype)
    times = {}
    t = _step("1/5 calibrate: one streaming pass over all domains")
    _run(
        calibrate,
        None,
        None,
        str(out / "calib"),
        a.samples_per_domain,
        a.seq_len,
        a.eval_windows,
        only=a.only or None,
        force=True,  # the demo owns its run folder: new settings replace the old calibration
        demo=True,
        token_clusters=a.experts if pick == "clusters" else 0,
        dtype=build_dtype,
    )
    times["calibrate"] = time.time() - t
    t = _step("2/5 mine: domain affinity and groups")
    _run(
        mine,
        str(out / "calib"),
        str(out / "mining"),
        a.experts,
        a.prune_ratio,
        eval_windows=a.mining_eval_windows,
        dtype=score_dtype,
        force=True,  # the demo owns its run folder: mining of another calibration replaces the old one
    )
    times["mine"] = time.time() - t
    t = _step("3/5 reconstruct: DIVE, the recommended MoE and baselines")
    moe = {"experts": a.experts, "top_k": a.top_k, "prune_ratio": a.prune_ratio}
    builds = {  # method: (groups file, settings)
        "dive": (str(out / "mining" / "groups.json"), reconstruct_config(method="dive", **moe)),
        "random-split": (None, reconstruct_config(method="random-split", **moe)),
        "nomining": (None, reconstruct_config(method="nomining", **moe)),
        "flap": (None, reconstruct_config(method="flap", prune_ratio=a.prune_ratio)),
    }
    if (
        pick == "clusters"
    ):  # DIVE's experts cut from each layer's token clusters (no domain labels, no mining)
        builds["clusters"] = (None, reconstruct_config(method="dive", groups_from="clusters", **moe))
    for name, (groups, cfg) in builds.items():
        # force: the demo owns these folders (the same build is reused, another one replaced)
        _run(
            run_reconstruct,
            str(out / "calib"),
            groups,
            str(out / f"moe-{name}"),
            cfg,
            None,
            shards=None,
            force=True,
        )
    times["reconstruct"] = time.time() - t
    t = _step(f"3b/5 fit-router: the {pick} MoE's routers from the dense model (reconstruction-error labels)")
    fitted = out / f"moe-{pick}-fitted"
    # 8 of the 16 windows per domain: half the cost, and measured no worse (calib held-out mean 127.0
    # against 126.8 with all 16; README "Router fitting")
    fit_cfg = RouterFitConfig(windows_per_domain=8)
    if fitted.exists() and _fit_is_current(fitted, out / f"moe-{pick}", out / "calib", fit_cfg, build_dtype):
        print(f"{fitted} already holds this fit; reusing it (delete it to refit)", flush=True)
    else:
        if fitted.exists():  # a rerun refits from the new reconstruction, replacing only the demo's own fit
            _remove_own_fit(fitted, out / f"moe-{pick}")
        _run(run_fit_router, str(out / f"moe-{pick}"), str(out / "calib"), str(fitted), fit_cfg, dense=None,
             dtype=build_dtype)  # fmt: skip
    times["fit_router"] = time.time() - t
    t = _step(
        "4/5 evaluate: perplexity per domain on the evaluation set (never calibrated, mined or trained on)"
    )
    cal = load_calibration(out / "calib")
    reg = _eval_registry(out, cal)
    ev = dict(
        registry=reg,
        eval_windows=a.eval_windows,
        seq_len=a.seq_len,
        seed=cal.manifest["sampler"]["seed"],
        dtype=score_dtype,
    )
    # (label, model, oracle, router): an untrained random router is only informative for DIVE itself, the
    # baselines are compared by oracle; the token-cluster MoE has no domain -> expert map and is scored fitted
    plan = [("dense", Path(resolve_model("demo")), True, True)]
    plan += [(n, out / f"moe-{n}", n != "flap", n in ("dive", "flap")) for n in builds if n != "clusters"]
    plan.append((f"{pick}-fitted", fitted, False, True))
    results = [_evaluate_owned(out, *e, ev) for e in plan]
    times["evaluate"] = time.time() - t
    if any(a.retrain_steps):
        t = _step(f"5/5 retrain the fitted {pick} MoE: LoRA experts stage (DeepSpeed ZeRO-2, 1 process)")
        retrained = _retrain(out, a, fitted)
        # scored in fp32 whatever --dtype says: 12 steps of LoRA move the merged weights by less than bf16
        # resolves (measured: the same retrained model 93.0 in bf16 against 91.4 in fp32, the fitted one 97.5
        # against 97.6), so bf16 would hide most of what retraining did
        results.append(
            _evaluate_owned(out, f"{pick}-retrained", retrained, False, True, ev | {"dtype": "fp32"})
        )
        times["retrain"] = time.time() - t
    table = markdown_table(results, cal.domains)
    means = {r["label"]: r for r in results}
    untrained = {
        f"{pick} fitted router": means[f"{pick}-fitted"]["router_mean"],
        "dive random router (paper init)": means["dive"]["router_mean"],
        "dive oracle routing": means["dive"]["oracle_mean"],
        "flap (dense pruning)": means["flap"]["router_mean"],
        "dense": means["dense"]["router_mean"],
    }
    mining_rep = json.loads((out / "mining" / "mining.json").read_text())
    summary = {
        "dtype": {"calibrate_fit_router": build_dtype, "mine_evaluate": score_dtype},
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "total_s": round(time.time() - t_all, 1),
        "mean_ppl": {
            r["label"]: {k: r[f"{k}_mean"] for k in ("router", "oracle") if f"{k}_mean" in r} for r in results
        },
        "family_recovery_ari": mining_rep.get("family_recovery_ari"),
        "fast_vs_paper": {
            k: v
            for k, v in mining_rep.get("fast_vs_paper", {}).items()
            if k in ("pearson", "spearman", "ari")
        },
        "groups": mining_rep["groups"],
        "untrained_mean_ppl": {k: round(v, 2) for k, v in untrained.items()},
        "fitted": pick,
        "fitted_vs_flap": round(untrained[f"{pick} fitted router"] / untrained["flap (dense pruning)"], 4),
    }
    write_text(out / "summary.md", table)
    write_json(out / "summary.json", summary)
    print(
        "\nHeld-out perplexity (oracle = each domain's tokens to its group's expert; `dive | router` is the "
        f"paper's random router init, `{pick}-fitted | router` the {pick} MoE's fitted one, both before "
        f"retraining; `{pick}-retrained | router` is that MoE after the experts stage"
        + (
            "; `clusters` = experts cut from each layer's token clusters, docs/beyond.md"
            if pick == "clusters"
            else ""
        )
        + "):\n"
    )
    print(table)
    print("Before any retraining, mean held-out perplexity at the same activated FFN width:")
    for k, v in untrained.items():
        print(f"  {k:<34} {v:8.1f}")
    print(f"  {pick} fitted / flap = {summary['fitted_vs_flap']:.3f}")
    print(f"family recovery of the mined groups (ARI): {summary['family_recovery_ari']}")
    print(f"fast vs paper affinity: {summary['fast_vs_paper']}")
    print(f"step times (s): {summary['times_s']}; total {summary['total_s']}s; outputs in {out}/")
    return summary


def _precision(name: str) -> tuple[str, str]:
    """(precision of the steps that build the model: calibration, router fitting; of the steps that score
    it: mining's pruned perplexities, evaluation), checked before any work and said once.

    `auto`: the builds in fp32 (the calibration, the token-cluster MoE and its fit are the fp32 demo's bit for
    bit; DIVE's groups come from bf16 pruned perplexities, the same groups here) and the scoring in bf16 where
    this machine multiplies bf16 natively (a bf16 GPU; a CPU with avx512_bf16 / amx_bf16: its matmuls ran at
    2.0-2.6x float32's here, and the demo's printed perplexities moved by at most 0.4%), else fp32. `bf16`:
    everything (the fastest; the built models differ, docs/speed.md section 9). Retraining, and the scoring
    of the retrained model, are fp32 either way."""
    from dive_ds.parallel.ranks import auto_dtype, resolve_device, resolve_dtype

    device = resolve_device("auto")
    score = auto_dtype(device) if name == "auto" else name
    build = "fp32" if name == "auto" else name
    for dtype in {build, score}:
        resolve_dtype(dtype, device)
    print(f"precision on {device.type}: calibration and router fitting {build}, mining and evaluation {score}"
          + (" (native bf16 here; --dtype fp32 for float32 throughout)" if score == "bf16" else "")
          + ", retraining and its scoring fp32", flush=True)  # fmt: skip
    return build, score


def _eval_registry(out: Path, cal) -> str:
    """A registry of the calibrated demo domains (the demo's own file in its run folder): `evaluate` draws
    its windows from their evaluation set, the split `calibrate` used (dive_ds.data.split)."""
    path = out / "eval_registry.json"
    domains = {n: {"family": cal.families.get(n), "source": {"type": "demo", "name": n}} for n in cal.domains}
    write_json(path, {"version": 1, "domains": domains}, indent=1)
    return str(path)


def _retrain(out: Path, a, fitted: Path) -> Path:
    """A short run of configs/demo_retrain.yaml on the demo's fitted MoE, in its own process
    (DeepSpeed sets up a process group; the demo itself stays free of one)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    router_steps, expert_steps = a.retrain_steps
    # ds_configs/zero2.json with the whole batch in one micro batch (one process): the same sequences per
    # step as 1 x 4 with gradient accumulation, in a quarter of the forwards (27% more tokens/s here)
    ds = json.loads((repo / "ds_configs" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = a.retrain_batch
    write_json(out / "retrain_ds_config.json", ds)
    cmd = [
        sys.executable,
        str(repo / "launchers" / "retrain.py"),
        "--deepspeed",
        str(out / "retrain_ds_config.json"),
        "--config",
        str(repo / "configs" / "demo_retrain.yaml"),
        # the demo owns OUT/retrain: a rerun (a new fit, another --groups-from) moves the earlier run's files
        # into OUT/retrain/superseded-*/ instead of refusing the folder (nothing is deleted)
        "--force",
        "--set",
        f"out_dir={out / 'retrain'}",
        "--set",
        f"model.path={fitted}",
        "--set",
        f"train.global_batch_size={a.retrain_batch}",
        "--set",
        f"stages.router.enabled={str(router_steps > 0).lower()}",
        "--set",
        f"stages.router.steps={max(router_steps, 1)}",
        "--set",
        f"stages.experts.steps={expert_steps}",
        "--set",
        f"checkpoint.every={router_steps + expert_steps}",
        "--set",
        "checkpoint.exclude_frozen=true",
        # no held-out evaluation inside the run: the demo scores the retrained model on its evaluation
        # windows like every other model (the trainer's own would score the same text a second time)
        "--set",
        "eval.at_start=false",
        "--set",
        "eval.every=0",
        "--set",
        "eval.at_end=false",
    ]
    if a.only:  # train on the demo's domains only, as every other step uses them
        cmd += ["--set", "data.domains=[" + ",".join(a.only) + "]"]
    print(
        f"{router_steps} router steps + {expert_steps} expert steps of {a.retrain_batch} x 256 tokens "
        "(the paper: ~0.5B + ~5B tokens); TensorBoard: tensorboard --logdir " + str(out / "retrain"),
        flush=True,
    )
    rc = subprocess.run(cmd, env=os.environ.copy()).returncode
    _check(rc)
    return out / "retrain" / "model"


def _run(step, *args, **kwargs) -> None:
    """One pipeline step, reported as `dive-ds STEP` reports it: a problem is one `dive-ds: error:` line,
    then the demo stops."""
    rc = 0
    try:
        step(*args, **kwargs)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"dive-ds: error: {error_message(e)}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("dive-ds: interrupted", file=sys.stderr)
        rc = 130
    _check(rc)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"demo step failed (exit {rc}); see the message above")


def _fit_is_current(fitted: Path, source: Path, calib: Path, cfg, dtype: str = "fp32") -> bool:
    """Is `fitted` this demo's fit of `source` from `calib` with `cfg` in `dtype` (a rerun that changed nothing
    reuses it; a refit would only change its recorded time, and with it every later step's identity)?"""
    from dataclasses import asdict

    from dive_ds.io.fingerprint import folder_fingerprint
    from dive_ds.parallel.ranks import dtype_record

    try:
        rec = json.loads((fitted / "router_fit.json").read_text())
        same_moe = (fitted / "dive_experts.json").read_bytes() == (source / "dive_experts.json").read_bytes()
    except (OSError, ValueError):
        return False
    return (
        same_moe
        and rec.get("moe") == str(source.resolve())
        and rec.get("calibration_fingerprint") == folder_fingerprint(calib)
        and rec.get("config") == json.loads(json.dumps(asdict(cfg)))
        and rec.get("dtype") == dtype_record(dtype)
    )


def _evaluate_owned(out: Path, label: str, model: Path, oracle: bool, router: bool, ev: dict) -> dict:
    """`evaluate` of `model` into OUT/eval-<label>, a folder the demo owns (_clear_stale_eval first)."""
    from dive_ds.build.evaluate import run_evaluate

    _clear_stale_eval(out, label, model, oracle, router, ev)
    return run_evaluate(
        str(model), None, out / f"eval-{label}", oracle=oracle, router=router, label=label, **ev
    )


def _clear_stale_eval(out: Path, label: str, model: Path, oracle: bool, router: bool, ev: dict) -> None:
    """OUT/eval-<label> holding an evaluation of another model or other windows (a rerun with other settings)
    is moved into a superseded-<time>/ folder beside it, never deleted; one holding this very evaluation is
    left for `evaluate` to rewrite."""
    from dive_ds.build.outputs import evaluation_identity, read_identity
    from dive_ds.io.atomic import move_aside

    folder = out / f"eval-{label}"
    recorded = read_identity(folder / "eval.json")
    want = evaluation_identity(model, None, ev["registry"], ev["eval_windows"], ev["seq_len"], ev["seed"],
                               oracle, router, ev.get("dtype", "fp32"))  # fmt: skip
    if recorded is not None and recorded != json.loads(json.dumps(want)):
        moved = move_aside(folder)
        print(f"{folder} held another evaluation; moved it to {moved}", flush=True)


def _remove_own_fit(fitted: Path, source: Path) -> None:
    """Delete `fitted` only if it is a fit-router output of `source` (this demo's own earlier fit)."""
    import shutil

    record = fitted / "router_fit.json"
    try:
        recorded = json.loads(record.read_text()).get("moe")
    except (OSError, ValueError):
        recorded = None
    if recorded != str(source.resolve()):
        raise ValueError(
            f"{fitted} is not this demo's router fit (no {record.name} naming {source}); "
            "move it away or pass another --out"
        )
    shutil.rmtree(fitted)
