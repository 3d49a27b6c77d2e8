"""The pipeline steps behind the CLI: mine, reconstruct, evaluate (validate first, then work)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dive_ds import mining
from dive_ds.calibrate import Calibration, check_same_model, load_calibration, run_manifest_base
from dive_ds.eval.perplexity import domain_nll, domain_perplexities, pruned_ffn, routing_report
from dive_ds.io.atomic import check_free_space, staged_dir, write_json
from dive_ds.io.atomic import write_text as atomic_write_text
from dive_ds.io.fingerprint import folder_fingerprint
from dive_ds.io.placement import NodePlacement
from dive_ds.io.shards import check_shard_out
from dive_ds.outputs import (
    PENDING_EVAL,
    check_not_input,
    claim_eval_out,
    claim_output,
    evaluation_identity,
    read_identity,
    reconstruction_identity,
    recorded_reconstruction,
)
from dive_ds.parallel.ranks import Ranks, launched_world, resolve_device, resolve_dtype, start_ranks
from dive_ds.reconstruct import ReconstructConfig, plan_experts, write_moe, write_moe_shards
from dive_ds.stats import channel_scores, kept_channels, mean_var, n_keep


def _precision(device: str, dtype: str) -> torch.dtype:
    """--device / --dtype checked before any work (the same verdict on every rank): the compute dtype."""
    _, _, local = launched_world()
    return resolve_dtype(dtype, resolve_device(device, local))


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
    mining.labels_from_groups(groups, domains)  # validates: unknown / duplicate / missing domains
    return {str(k): list(v) for k, v in groups.items()}


def _model_path(cal: Calibration, model: str | None) -> Path:
    from dive_ds.models.loading import local_snapshot, resolve_model

    return Path(local_snapshot(resolve_model(model))) if model else Path(cal.manifest["model"]["path"])


def run_mine(
    calib_dir: str | Path,
    out: str | Path,
    num_groups: int,
    prune_ratio: float = 0.5,
    score: str = "wifv",
    bias_compensation: bool = True,
    fast_only: bool = False,
    eval_windows: int | None = None,
    model: str | None = None,
    batch_size: int = 8,
    linkage: str = "average",
    device: str = "auto",
    dtype: str = "fp32",
) -> dict | None:
    """Domain affinity mining: D x D pruned perplexities (paper) and the fast statistics-only affinity.

    `out` is written whole (a temporary folder, then its files moved in, mining.json last); an `out`
    holding this same mining run is reused, one holding anything else is refused. The pruned models
    run on `device` in `dtype`; launched by torchrun, every rank evaluates its share of the windows,
    the sums are all-reduced and rank 0 alone writes `out` and returns the report (others: None)."""
    torch_dtype = _precision(device, dtype)
    with start_ranks(device) as ranks:
        return _mine(calib_dir, out, num_groups, prune_ratio, score, bias_compensation, fast_only,
                     eval_windows, model, batch_size, linkage, ranks, torch_dtype)  # fmt: skip


def _mine(calib_dir, out, num_groups, prune_ratio, score, bias_compensation, fast_only, eval_windows, model,
          batch_size, linkage, ranks: Ranks, torch_dtype: torch.dtype) -> dict | None:  # fmt: skip
    cal = load_calibration(calib_dir)
    n_dom = len(cal.domains)
    if num_groups > n_dom:
        raise ValueError(
            f"--experts {num_groups} is larger than the {n_dom} domains; "
            f"use --experts <= {n_dom} or pass --groups FILE"
        )
    keep = n_keep(cal.stats.sum_DLF.shape[2], prune_ratio)
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"--eval-windows {eval_windows}: use >= 1 (or leave it out: all held-out windows)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: use >= 1")
    final, identity = Path(out), {
        "calibration": str(cal.path.resolve()),
        "calibration_identity": cal.manifest.get("identity"),
        "model_fingerprint": cal.fingerprint,
        "experts": num_groups, "prune_ratio": prune_ratio, "score": score, "bias_compensation": bias_compensation,
        "fast_only": fast_only, "eval_windows": None if fast_only else eval_windows, "linkage": linkage,
    }  # fmt: skip
    if torch_dtype != torch.float32 and not fast_only:  # bf16 pruned perplexities differ from fp32 ones
        identity["dtype"] = str(torch_dtype).removeprefix("torch.")
    check_not_input(final, {"calibration": cal.path})
    recorded = read_identity(final / "mining.json")
    if claim_output(final, identity, recorded, "mining.json", force=False, has_force=False):
        if ranks.is_main:
            print(f"{final} already holds this mining run; reusing it (delete it to recompute)")
        return json.loads((final / "mining.json").read_text()) if ranks.is_main else None
    evals = {n: w[:eval_windows] if eval_windows is not None else w for n, w in cal.eval.items()}
    model_dir = None
    if not fast_only:
        ranks.check_items(sum(w.shape[0] for w in evals.values()), "held-out windows (over all domains)")
        model_dir = _model_path(cal, model)
        check_same_model(cal, model_dir)
    ranks.barrier()  # every rank has checked `out` before rank 0 may write it
    t0 = time.time()
    pruned = None
    if not fast_only:
        pruned = pruned_perplexities(cal, model_dir, evals, keep, score, bias_compensation, batch_size, ranks,
                                     torch_dtype)  # fmt: skip
    if not ranks.is_main:
        return None
    with staged_dir(final) as out:  # the whole folder appears at once
        report = _mine_into(out, cal, identity, num_groups, keep, prune_ratio, score, fast_only, pruned, evals,
                            linkage, t0)  # fmt: skip
    return report


def pruned_perplexities(cal: Calibration, model_dir: Path, evals: dict[str, torch.Tensor], keep: int, score: str,
                        bias_compensation: bool, batch_size: int, ranks: Ranks,
                        torch_dtype: torch.dtype = torch.float32) -> np.ndarray:  # fmt: skip
    """ppl_DD[i, j]: the dense model pruned with domain i's mask, on domain j's held-out windows (each rank
    its share of the windows; NLL and token sums all-reduced in float64)."""
    from dive_ds.models.loading import load_dense_model

    names = cal.domains
    scores = channel_scores(cal.stats, score)  # [D, L, F]
    dense = load_dense_model(model_dir, dtype=torch_dtype).to(ranks.device)
    mean, _ = mean_var(cal.stats.count_D, cal.stats.sum_DLF, cal.stats.sumsq_DLF)
    nll_DD = torch.zeros(len(names), len(names), dtype=torch.float64)
    tok_DD = torch.zeros_like(nll_DD)
    t0 = time.time()
    for i, name in enumerate(names):
        kept = kept_channels(scores[i], keep)
        with pruned_ffn(dense, kept, mean[i] if bias_compensation else None):
            nll_DD[i], tok_DD[i] = domain_nll(dense, {n: evals[n] for n in names}, batch_size, ranks=ranks)
        if ranks.is_main:
            own = math.exp(nll_DD[i, i].item() / tok_DD[i, i].item())
            print(f"  pruned on {name:<20} own ppl {own:8.2f}   ({time.time() - t0:.0f}s)", flush=True)
    return (nll_DD / tok_DD).exp().numpy()


def _mine_into(out: Path, cal: Calibration, identity: dict, num_groups: int, keep: int, prune_ratio: float,
               score: str, fast_only: bool, ppl: np.ndarray | None, evals: dict[str, torch.Tensor],
               linkage: str, t0: float) -> dict:  # fmt: skip
    names, n_dom = cal.domains, len(cal.domains)
    scores = channel_scores(cal.stats, score)  # [D, L, F]
    report: dict = run_manifest_base("mining") | {
        "identity": identity,
        "calibration": str(cal.path),
        "domains": names,
        "families": cal.families,
        "prune_ratio": prune_ratio,
        "score": score,
        "experts": num_groups,
    }
    fast = mining.jaccard_affinity(mining.kept_sets(scores.numpy(), keep / scores.shape[2]))
    mining.write_matrix_csv(out / "fast_affinity.csv", fast, names, names)
    if not fast_only:
        mining.write_matrix_csv(out / "pruned_ppl.csv", ppl, names, names)
        affinity = mining.pearson_similarity(mining.normalise_columns(ppl))
        mining.write_matrix_csv(out / "affinity.csv", affinity, names, names)
        cmp = mining.compare_affinities(affinity, fast, num_groups, method=linkage) if n_dom > 1 else {}
        report["fast_vs_paper"] = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cmp.items()
        }
        report["pruned_eval_tokens"] = int(sum(w.numel() for w in evals.values()) * n_dom)
    else:
        affinity = fast
    report["mining_seconds"] = round(time.time() - t0, 1)
    labels = mining.cluster_domains(affinity, num_groups, method=linkage)
    groups = mining.groups_from_labels(labels, names)
    report["groups"] = groups
    report["affinity_used"] = "fast (jaccard of kept channels)" if fast_only else "paper (pruned perplexity)"
    fams = [cal.families.get(n) for n in names]
    if all(fams):
        report["family_recovery_ari"] = mining.family_recovery(labels, fams)
        report["family_recovery_ari_fast"] = mining.family_recovery(
            mining.cluster_domains(fast, num_groups), fams
        )
    if n_dom > 1:
        mining.plot_affinity(
            affinity,
            names,
            labels,
            out / "affinity.png",
            f"domain affinity ({report['affinity_used']}), {num_groups} groups",
        )
        mining.plot_affinity(
            fast,
            names,
            mining.cluster_domains(fast, num_groups),
            out / "fast_affinity.png",
            f"fast affinity (kept-channel Jaccard), {num_groups} groups",
        )
    write_json(out / "mining.json", report)
    write_json(out / "groups.json", groups)
    return report


def run_reconstruct(
    calib_dir: str | Path,
    groups_file: str | Path | None,
    out: str | Path,
    cfg: ReconstructConfig,
    model: str | None = None,
    shards: NodePlacement | None = None,
    force: bool = False,
) -> Path:
    """Plan the experts and write the MoE: one HF folder, or with `shards` this node's part of a sharded folder.

    An `out` that holds this same reconstruction is reused; anything else there is refused unless `force`."""
    if shards is not None:
        if force:
            raise ValueError("--force does not apply with --shards (the nodes share the shard folder); "
                             "choose another --out or remove it")  # fmt: skip
        if cfg.router_init == "fit":
            raise ValueError(
                "--router-init fit needs the whole MoE: reconstruct --shards with --router-init random, then run "
                "`dive-ds fit-router --moe SHARDS --calib DIR --out DIR` once every node has finished"
            )
        shards.check(cfg.num_experts)
        check_shard_out(Path(out))
    cal = load_calibration(calib_dir)
    n_layers, ffn = cal.stats.sum_DLF.shape[1:]
    if cfg.num_experts > ffn:
        raise ValueError(
            f"--experts {cfg.num_experts}: the model's FFN has {ffn} channels; use at most {ffn} experts"
        )
    groups = None
    if cfg.method == "dive":
        if groups_file is None:
            raise ValueError("dive reconstruction needs --groups FILE (from `dive-ds mine`, or your own)")
        groups = load_groups(groups_file, cal.domains)
        if len(groups) != cfg.num_experts:
            raise ValueError(
                f"--experts {cfg.num_experts} but {groups_file} has {len(groups)} groups; "
                "make them equal (re-run `dive-ds mine --experts N`)"
            )
    if cfg.method == "nomining" and cfg.num_experts > len(cal.domains):
        raise ValueError(
            f"--experts {cfg.num_experts} is larger than the {len(cal.domains)} domains; "
            f"use --experts <= {len(cal.domains)}"
        )
    model_dir = _model_path(cal, model)
    if shards is None:
        inputs = {"calibration": cal.path, "dense model": model_dir, "groups file": groups_file}
        check_not_input(Path(out), inputs)
    check_same_model(cal, model_dir)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    width = ffn // cfg.num_experts if cfg.method == "llama-moe" else n_keep(ffn, cfg.prune_ratio)
    experts_bytes = 3 * 4 * hidden * n_layers * cfg.num_experts * width  # fp32; a lower bound of the MoE
    plan = plan_experts(cal.stats, cal.domains, groups, cfg)
    identity = reconstruction_identity(plan, cfg, model_dir, cal.fingerprint)
    # the calibration's own fingerprint too: `compare --reuse-models` reuses a model only if it is unchanged
    extra = {
        "calibration": str(cal.path),
        "calibration_fingerprint": folder_fingerprint(cal.path),
        "identity": identity,
    }
    t0 = time.time()
    if shards is not None:
        check_free_space(Path(out), experts_bytes // shards.nodes, "the MoE's experts at --out")
        rec = write_moe_shards(model_dir, plan, cfg, out, shards, extra_info=extra)
        n = f"node {shards.node}/{shards.nodes}"
        if rec["reused"]:
            print(
                f"{n}: reused its complete shards in {out} (nodes/node-{shards.node:05d}.json); nothing to do"
            )
        else:
            print(
                f"{n} wrote experts {rec['experts']} (of {cfg.num_experts}) of {len(plan.widths_L)} layers"
                f"{' and the shared tensors' if shards.node == 0 else ''}: {len(rec['files'])} files, "
                f"{rec['tensor_bytes'] / 2**20:.1f} MiB to {out} in {time.time() - t0:.1f}s"
            )
        return Path(out)
    if cfg.router_init == "fit":
        check_free_space(Path(out), experts_bytes, "the MoE's experts at --out")
        return _reconstruct_fitted(model_dir, plan, cfg, out, cal, t0)
    recorded = recorded_reconstruction(Path(out), identity, plan)  # None: out holds no write_moe output
    if claim_output(Path(out), identity, recorded, "dive_experts.json", force):
        print(f"{out} already holds this reconstruction; reusing it (delete it to rebuild)")
        return Path(out)
    check_free_space(Path(out), experts_bytes, "the MoE's experts at --out")  # after the reuse check
    write_moe(model_dir, plan, cfg, out, extra_files=extra)
    print(
        f"wrote {cfg.method} MoE ({cfg.num_experts} experts x {_width(plan.widths_L)} channels, top-{cfg.top_k}) "
        f"to {out} in {time.time() - t0:.1f}s"
    )
    return Path(out)


def _width(widths_L: list[int]) -> str:
    """One width, or the range of per-layer widths (adaptive FLAP)."""
    lo, hi = min(widths_L), max(widths_L)
    return str(lo) if lo == hi else f"{lo}-{hi} (per layer, {sum(widths_L)} in all)"


def _reconstruct_fitted(
    model_dir: Path, plan, cfg: ReconstructConfig, out, cal: Calibration, t0: float
) -> Path:
    """write_moe into a private temporary folder next to `out`, fit its routers into `out`, remove the temporary."""

    out = Path(out)
    _check_new_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.unfitted-"))
    try:
        write_moe(model_dir, plan, cfg, tmp / "moe", extra_files={"calibration": str(cal.path)})
        print(f"wrote {cfg.method} MoE in {time.time() - t0:.1f}s; fitting its routers", flush=True)
        run_fit_router(tmp / "moe", cal.path, out, dense=model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_new_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; choose a new --out (nothing was written)")


def run_fit_router(
    moe: str | Path,
    calib_dir: str | Path,
    out: str | Path,
    cfg=None,
    dense: str | Path | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict:
    """Fit every router of a dive_moe folder (HF or sharded) from the dense model; write the result to `out`.

    The resident layer runs on `device` in `dtype`; launched by torchrun, every rank carries its share of
    the calibration windows and fits on all of them (gathered); rank 0 alone writes `out`."""
    torch_dtype = _precision(device, dtype)
    with start_ranks(device) as ranks:
        return _fit_router(moe, calib_dir, out, cfg, dense, ranks, torch_dtype)


def _moe_source_fingerprint(moe: Path) -> str | None:
    """The fingerprint of the dense model a dive_moe folder was reconstructed from (None: not recorded)."""
    try:
        info = json.loads((moe / "dive_experts.json").read_text())
    except (OSError, ValueError):
        return None
    ident = info.get("identity") if isinstance(info, dict) else None
    return ident.get("dense_model_fingerprint") if isinstance(ident, dict) else None


def _fit_router(moe, calib_dir, out, cfg, dense, ranks: Ranks, torch_dtype: torch.dtype) -> dict:
    from dive_ds.routerfit import MoeLayers, RouterFitConfig, fit_routers, rewritten_bytes, write_fitted

    cfg = cfg or RouterFitConfig()
    out, moe = Path(out), Path(moe)
    _check_new_out(out)
    if out.resolve() == moe.resolve():
        raise ValueError(f"--out {out} is the input folder; choose a new --out (the input is never modified)")
    cal = load_calibration(calib_dir)
    layers = MoeLayers(moe)
    dense_dir = Path(dense) if dense is not None else Path(cal.manifest["model"]["path"])
    check_same_model(cal, dense_dir)
    c = layers.config
    if (c.num_hidden_layers, c.hidden_size) != (
        cal.stats.sum_DLF.shape[1],
        cal.stats.mlp_in_sum_DLH.shape[2],
    ):
        raise ValueError(
            f"{moe} has {c.num_hidden_layers} layers x hidden {c.hidden_size} but the calibration in {cal.path} "
            "is of another model; pass the calibration the MoE was reconstructed from"
        )
    made_from = _moe_source_fingerprint(moe)
    if made_from is not None and made_from != cal.fingerprint:
        raise ValueError(
            f"{moe} was reconstructed from another model (fingerprint {made_from}) than the one {cal.path} "
            f"calibrated ({cal.fingerprint}); pass the calibration the MoE was reconstructed from"
        )
    top = max(int(w.max()) for w in cal.calib.values())
    if top >= c.vocab_size:
        raise ValueError(
            f"the calibration in {cal.path} holds token id {top} but {moe} has a vocabulary of {c.vocab_size}: "
            "another tokenizer; pass a calibration made with this model's tokenizer"
        )
    n_win = sum(min(w.shape[0], cfg.windows_per_domain or w.shape[0]) for w in cal.calib.values())
    ranks.check_items(n_win, "calibration windows (over all domains)")
    # before the fit, not after it (the files holding a router are written anew); on every rank, so that
    # every rank stops, not rank 0 alone
    check_free_space(out, rewritten_bytes(moe), "the fitted MoE at --out")
    ranks.barrier()  # every rank has checked `out` before rank 0 may write it
    routers, report = fit_routers(moe, dense_dir, cal.calib, cfg, ranks=ranks, dtype=torch_dtype)
    report |= {
        "moe": str(moe.resolve()),
        "calibration": str(cal.path.resolve()),
        "calibration_fingerprint": folder_fingerprint(cal.path),
        "dense_model": str(Path(dense_dir).resolve()),
    }
    calib_rate = cal.manifest.get("pass", {}).get("tokens_per_s")
    if calib_rate:
        report["calibration_tokens_per_s"] = calib_rate
    if not ranks.is_main:
        return report
    write_fitted(moe, out, routers, report)
    print(
        f"fitted {len(routers)} routers ({report['target']} targets) on {report['fit_tokens']} tokens in "
        f"{report['seconds']}s ({report['tokens_per_s']} tokens/s; calibration pass: {calib_rate} tokens/s); "
        f"held-out label accuracy {report['mean_label_accuracy_heldout']:.3f}, "
        f"routed error / best {report['mean_excess_error_heldout']:.3f} -> {out}",
        flush=True,
    )
    return report


def oracle_map(model_dir: Path, domains: list[str]) -> dict[str, int] | None:
    """domain -> expert index from the checkpoint's recorded groups (None if it has none)."""
    meta = model_dir / "dive_experts.json"
    if not meta.exists():
        return None
    try:
        groups = json.loads(meta.read_text())["groups"]
        experts = int(json.loads((model_dir / "config.json").read_text())["num_local_experts"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta} or its config.json is unreadable or lacks {e}; restore the file") from None
    if (
        not isinstance(groups, dict)
        or not all(isinstance(m, list) and all(isinstance(d, str) for d in m) for m in groups.values())
        or not 1 <= len(groups) <= experts
    ):
        raise ValueError(
            f"{meta}: `groups` must map at most num_local_experts={experts} group names to lists of domains "
            f"(found {type(groups).__name__} of {len(groups) if isinstance(groups, dict) else '?'}); restore the file"
        )
    mapping = {d: e for e, members in enumerate(groups.values()) for d in members}
    if not all(d in mapping for d in domains):
        return (
            {d: 0 for d in domains}
            if len(groups) == 1
            else {d: i % len(groups) for i, d in enumerate(domains)}
        )  # random baselines: a fixed arbitrary map
    return mapping


def registry_eval_windows(
    registry: str | Path, model_dir: Path, eval_windows: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Windows spread over every registry domain's evaluation set (the four-way split of `seed`,
    dive_ds.data.split): never calibration, selection or training text of the same split."""
    from dive_ds.data.registry import iter_documents, load_registry
    from dive_ds.data.sampler import eval_chars_budget, evaluation_windows
    from dive_ds.data.split import SplitConfig
    from dive_ds.models.loading import load_tokenizer

    reg = load_registry(registry)
    tok = load_tokenizer(model_dir)
    split = SplitConfig(seed=seed)
    return {
        d.name: evaluation_windows(
            d.name,
            list(iter_documents(d, eval_chars_budget(eval_windows, seq_len, split, d.source.type))),
            tok,
            eval_windows,
            seq_len,
            split,
        )[0]
        for d in reg.domains.values()
    }


def run_evaluate(
    model: str,
    calib_dir: str | Path | None,
    out: str | Path | None = None,
    oracle: bool = True,
    batch_size: int = 8,
    eval_windows: int | None = None,
    label: str | None = None,
    router: bool = True,
    registry: str | Path | None = None,
    seq_len: int = 256,
    seed: int = 42,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> dict:
    """Held-out perplexity per domain (+ oracle routing for a MoE) and/or lm-eval task accuracies;
    writes eval.json, eval.md and TensorBoard scalars (tb/).

    Windows come from a calibration folder (`calib_dir`) or are drawn from a registry; `tasks` are
    lm-eval task names (`dive_ds.eval.downstream`), checked before the model is loaded. The model sits
    on `device` in `dtype`; launched by torchrun, every rank evaluates its share of the windows, the sums
    are all-reduced and rank 0 alone writes `out` (every rank returns the same result)."""
    torch_dtype = _precision(device, dtype)  # refused here, the same on every rank, before anything starts
    with start_ranks(device) as ranks:
        return _evaluate(model, calib_dir, out, oracle, batch_size, eval_windows, label, router, registry,
                         seq_len, seed, tasks, limit, num_fewshot, ranks, torch_dtype)  # fmt: skip


def _evaluate(model, calib_dir, out, oracle, batch_size, eval_windows, label, router, registry, seq_len, seed,
              tasks, limit, num_fewshot, ranks: Ranks, torch_dtype: torch.dtype) -> dict:  # fmt: skip
    from dive_ds.models.loading import load_causal_lm, load_tokenizer, resolve_model
    from dive_ds.models.moe import DiveMoeConfig, count_parameters

    if tasks and ranks.distributed:
        raise ValueError(f"--tasks runs lm-eval on one process, not on {ranks.world} ranks; "
                         "launch evaluate --tasks without torchrun")  # fmt: skip
    if calib_dir is not None and registry is not None:
        raise ValueError("pass one of --calib DIR (its held-out windows) or --domains REGISTRY, not both")
    if calib_dir is None and registry is None and not tasks:
        raise ValueError("nothing to evaluate: pass --calib DIR or --domains REGISTRY (perplexity), "
                         "and/or --tasks T1,T2 (lm-eval accuracy)")  # fmt: skip
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: pass a positive number of items per task")
    tm = None
    if tasks:
        from dive_ds.eval.downstream import resolve_tasks

        tm, tasks = resolve_tasks(tasks)  # unknown names stop here, before any model is loaded
    model_dir = Path(resolve_model(model))
    identity = None
    if out is not None:  # before any heavy work
        out = Path(out)
        identity = evaluation_identity(
            model_dir, calib_dir, registry, eval_windows, seq_len, seed, oracle, router
        )
        if tasks:
            identity["tasks"] = {"names": tasks, "limit": limit, "num_fewshot": num_fewshot}
        if torch_dtype != torch.float32:  # bf16 numbers differ; fp32 folders from before --dtype stay valid
            identity["dtype"] = str(torch_dtype).removeprefix("torch.")
        check_not_input(out, {"model": model_dir, "calibration": calib_dir})
        claim_eval_out(out, identity)
    evals: dict[str, torch.Tensor] = {}
    source = None
    if calib_dir is not None:
        cal = load_calibration(calib_dir)
        evals = {n: w[:eval_windows] if eval_windows is not None else w for n, w in cal.eval.items()}
        source = str(cal.path)
    elif registry is not None:
        evals = registry_eval_windows(
            registry, model_dir, 16 if eval_windows is None else eval_windows, seq_len, seed
        )
        source = str(registry)
    domains = list(evals)
    if evals:
        ranks.check_items(sum(w.shape[0] for w in evals.values()), "held-out windows (over all domains)")
    mapping = (
        oracle_map(model_dir, domains) if evals and model_dir.is_dir() else None
    )  # checked before loading
    ranks.barrier()  # every rank has checked `out` before rank 0 may write it
    m = load_causal_lm(model_dir, dtype=torch_dtype).eval().to(ranks.device)  # refuses missing weights
    t0 = time.time()
    res: dict = {
        "model": str(model_dir),
        "label": label or model_dir.name,
        "eval_source": source,
        "domains": domains,
    }
    moe = isinstance(m.config, DiveMoeConfig)
    n = None if moe else sum(p.numel() for p in m.parameters())
    res["params"] = count_parameters(m.config) if moe else {"total": n, "activated": n}
    if not evals:
        res |= _downstream(m, load_tokenizer(model_dir, m.config), tasks, tm, limit, num_fewshot, batch_size)
        return _finish_evaluate(res, out, identity)
    if moe:
        if router or not oracle:
            rr = routing_report(m, evals, batch_size, expected=mapping, ranks=ranks)
            res["router"] = rr["ppl"]
            res["expert_load"] = rr["expert_load"]
            res["routed_to_own_expert"] = rr["routed_to_own_expert"]
        if oracle and mapping is not None:
            res["oracle"] = domain_perplexities(m, evals, batch_size, oracle=mapping, ranks=ranks)
            res["oracle_map"] = mapping
    else:
        res["router"] = domain_perplexities(m, evals, batch_size, ranks=ranks)
    for key in ("router", "oracle"):
        if key in res:
            res[f"{key}_mean"] = float(np.mean(list(res[key].values())))
    res["tokens"] = int(sum(w.numel() for w in evals.values())) * (("oracle" in res) + ("router" in res))
    res["seconds"] = round(time.time() - t0, 1)
    res["tokens_per_s"] = round(res["tokens"] / max(res["seconds"], 1e-9), 1)
    res["ranks"] = ranks.world
    res["device"] = ranks.device.type
    res["dtype"] = str(torch_dtype).removeprefix("torch.")
    if tasks:
        res |= _downstream(m, load_tokenizer(model_dir, m.config), tasks, tm, limit, num_fewshot, batch_size)
    return _finish_evaluate(res, out if ranks.is_main else None, identity)


def _downstream(m, tok, tasks, tm, limit, num_fewshot, batch_size) -> dict:
    """lm-eval accuracies of the loaded model: {"tasks": ..., "lm_eval": ..., "tasks_seconds": ...}."""
    from dive_ds.eval.downstream import hflm, run_tasks

    t0 = time.time()
    found = run_tasks(hflm(m, tok, batch_size), tasks, tm, limit, num_fewshot)
    return found | {"tasks_seconds": round(time.time() - t0, 1)}


def _finish_evaluate(res: dict, out: Path | None, identity: dict | None) -> dict:
    """eval.md, tb/ and eval.json into `out` (its other files untouched). `.eval-pending.json` names the
    run while it writes, so a run killed mid-way leaves files the same evaluation may replace; tb/ is
    built aside and swapped in whole: one event file per evaluation, however often it is rerun."""
    if out is not None:
        from dive_ds.eval.downstream import write_tensorboard

        out.mkdir(parents=True, exist_ok=True)
        write_json(out / PENDING_EVAL, {"identity": identity})
        atomic_write_text(out / "eval.md", evaluation_markdown(res))
        tb = Path(tempfile.mkdtemp(dir=out, prefix=".tb-new-"))
        try:
            write_tensorboard(tb, res)
            old = None
            if (out / "tb").exists():  # this evaluation's own earlier scalars (claim_eval_out checked)
                old = Path(tempfile.mkdtemp(dir=out, prefix=".tb-old-"))
                os.replace(out / "tb", old / "tb")
            os.replace(tb, out / "tb")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tb, ignore_errors=True)
        write_json(out / "eval.json", res | {"identity": identity})  # the record last
        (out / PENDING_EVAL).unlink()
    return res


def evaluation_markdown(res: dict) -> str:
    """eval.md: the perplexity table (when there are domains) and the accuracy table (when there are tasks)."""
    from dive_ds.eval.downstream import accuracy_table

    parts = [markdown_table([res], res["domains"])] if res["domains"] else []
    if res.get("tasks"):
        parts.append(accuracy_table([res]))
    return "\n".join(parts)


def markdown_table(results: list[dict], domains: list[str]) -> str:
    """One row per (model, routing): perplexity per domain, mean, total / activated parameters."""
    head = "| model | routing | " + " | ".join(domains) + " | mean | total params | activated |\n"
    head += "|---" * (len(domains) + 5) + "|\n"
    rows = []
    for r in results:
        for key in ("router", "oracle"):
            if key not in r:
                continue
            ppl = r[key]
            routing = {
                "router": "router" if "oracle_map" in r or "expert_load" in r else "dense",
                "oracle": "oracle",
            }[key]
            rows.append(
                f"| {r['label']} | {routing} | "
                + " | ".join(_fmt(ppl[d]) for d in domains)
                + f" | {_fmt(r[key + '_mean'])} | {r['params']['total'] / 1e6:.1f}M | "
                f"{r['params']['activated'] / 1e6:.1f}M |"
            )
    return head + "\n".join(rows) + "\n"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.1f}" if x < 1000 else f"{x:.3g}"
