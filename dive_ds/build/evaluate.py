"""`dive-ds evaluate`: perplexity per domain on held-out windows (router and oracle routing), expert load,
and lm-eval task accuracy; eval.json, eval.md and TensorBoard scalars."""

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

from dive_ds.build.outputs import (
    PENDING_EVAL,
    check_not_input,
    claim_eval_out,
    evaluation_identity,
)
from dive_ds.eval.perplexity import domain_perplexities, routing_report
from dive_ds.io.atomic import write_json
from dive_ds.io.atomic import write_text as atomic_write_text
from dive_ds.io.calibration import load_calibration
from dive_ds.parallel.ranks import Ranks, compute_dtype, dtype_name, start_ranks


def oracle_map(model_dir: Path, domains: list[str]) -> dict[str, int] | None:
    """domain -> expert index from the checkpoint's recorded groups (None if it has none)."""
    meta = model_dir / "dive_experts.json"
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if (info.get("reconstruction") or {}).get("groups_from") == "clusters":
            return None  # expert c is layer l's token cluster c: no domain goes to one expert in every layer
        groups = info["groups"]
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


_WINDOWS: dict[tuple, dict[str, torch.Tensor]] = {}
"""registry_eval_windows' results in this process, by registry file, tokenizer files and settings (the demo
evaluates seven models of one tokenizer on the same windows: drawn and tokenized once)."""


def _tokenizer_digest(model_dir: Path) -> str:
    """sha256 of a model folder's tokenizer files (tokenizer*, special_tokens_map.json, vocab*, merges*, *.model)
    and of the class AutoTokenizer picks (tokenizer_config.json's tokenizer_class, else config.json's
    model_type)."""
    import hashlib

    h = hashlib.sha256()
    folder = Path(model_dir)
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                            or f.suffix == ".model"):  # fmt: skip
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    try:
        cls = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        cls = None
    if not cls and (folder / "config.json").is_file():
        cls = "model_type:" + str(json.loads((folder / "config.json").read_text()).get("model_type"))
    h.update(str(cls).encode())
    return h.hexdigest()


def registry_eval_windows(
    registry: str | Path, model_dir: Path, eval_windows: int, seq_len: int, seed: int
) -> dict[str, torch.Tensor]:
    """Windows spread over every registry domain's evaluation set (the four-way split of `seed`,
    dive_ds.data.split): never calibration, selection or training text of the same split. Drawn once per
    process for the same registry (its definition: data files changed within one process are not seen),
    tokenizer files and settings; each call gets its own copy."""
    from dive_ds.data.registry import load_registry

    reg = load_registry(registry)
    if not Path(model_dir).is_dir():  # a hub id: its tokenizer is fetched by name, nothing to digest here
        return _draw_eval_windows(reg, model_dir, eval_windows, seq_len, seed)
    key = (repr(reg), _tokenizer_digest(model_dir), eval_windows, seq_len, seed)
    if key not in _WINDOWS:
        _WINDOWS[key] = _draw_eval_windows(reg, model_dir, eval_windows, seq_len, seed)
    return {name: w.clone() for name, w in _WINDOWS[key].items()}


def _draw_eval_windows(reg, model_dir, eval_windows, seq_len, seed) -> dict[str, torch.Tensor]:
    from dive_ds.data.registry import iter_documents
    from dive_ds.data.sampler import eval_chars_budget, evaluation_windows
    from dive_ds.data.split import SplitConfig
    from dive_ds.io.loading import load_tokenizer

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
    streamed: bool = True,
) -> dict:
    """Held-out perplexity per domain (+ oracle routing for a MoE) and/or lm-eval task accuracies;
    writes eval.json, eval.md and TensorBoard scalars (tb/).

    Windows come from a calibration folder (`calib_dir`) or are drawn from a registry; `tasks` are
    lm-eval task names (`dive_ds.eval.downstream`), checked before the model is loaded. The model sits
    on `device` in `dtype`; launched by torchrun, every rank evaluates its share of the windows, the sums
    are all-reduced and rank 0 alone writes `out` (every rank returns the same result).

    `streamed` (perplexity without --tasks, a local folder): one decoder layer resident at a time, the
    windows' hidden states carried (dive_ds/eval/streamed.py), so no rank holds the whole model; equal to
    the whole-model evaluation up to float rounding. A sharded MoE folder is always evaluated streamed."""
    torch_dtype = compute_dtype(device, dtype)  # refused here, the same on every rank, before anything starts
    with start_ranks(device) as ranks:
        return _evaluate(model, calib_dir, out, oracle, batch_size, eval_windows, label, router, registry,
                         seq_len, seed, tasks, limit, num_fewshot, ranks, torch_dtype, streamed)  # fmt: skip


def _evaluate(model, calib_dir, out, oracle, batch_size, eval_windows, label, router, registry, seq_len, seed,
              tasks, limit, num_fewshot, ranks: Ranks, torch_dtype: torch.dtype, streamed: bool = True) -> dict:  # fmt: skip
    from dive_ds.io.loading import load_causal_lm, load_tokenizer, resolve_model
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
            model_dir,
            calib_dir,
            registry,
            eval_windows,
            seq_len,
            seed,
            oracle,
            router,
            dtype_name(torch_dtype),
        )
        if tasks:
            identity["tasks"] = {"names": tasks, "limit": limit, "num_fewshot": num_fewshot}
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
    from dive_ds.io.shards import is_sharded

    sharded = model_dir.is_dir() and is_sharded(model_dir)
    if sharded and tasks:
        raise ValueError(f"{model_dir} is a sharded MoE: --tasks needs the whole model; run "
                         "`dive-ds consolidate --shards` first, or evaluate perplexity alone (streamed)")  # fmt: skip
    if evals and not tasks and (sharded or (streamed and model_dir.is_dir())):
        return _evaluate_streamed(model_dir, evals, res_head(model_dir, label, source, domains), mapping, oracle,
                                  router, batch_size, ranks, torch_dtype, out, identity)  # fmt: skip
    m = load_causal_lm(model_dir, dtype=torch_dtype).eval().to(ranks.device)  # refuses missing weights
    t0 = time.time()
    res = res_head(model_dir, label, source, domains)
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
    res |= _tail(res, evals, t0, ranks, torch_dtype, "whole model")
    if tasks:
        res |= _downstream(m, load_tokenizer(model_dir, m.config), tasks, tm, limit, num_fewshot, batch_size)
    return _finish_evaluate(res, out if ranks.is_main else None, identity)


def res_head(model_dir: Path, label: str | None, source: str | None, domains: list[str]) -> dict:
    return {
        "model": str(model_dir),
        "label": label or model_dir.name,
        "eval_source": source,
        "domains": domains,
    }


def _tail(res: dict, evals: dict, t0: float, ranks: Ranks, torch_dtype: torch.dtype, how: str) -> dict:
    """Means, tokens, time and where it ran."""
    tail = {f"{k}_mean": float(np.mean(list(res[k].values()))) for k in ("router", "oracle") if k in res}
    tail["tokens"] = int(sum(w.numel() for w in evals.values())) * (("oracle" in res) + ("router" in res))
    tail["seconds"] = round(time.time() - t0, 1)
    tail["tokens_per_s"] = round(tail["tokens"] / max(tail["seconds"], 1e-9), 1)
    return tail | {"ranks": ranks.world, "device": ranks.device.type,
                   "dtype": str(torch_dtype).removeprefix("torch."), "evaluated": how}  # fmt: skip


def _evaluate_streamed(model_dir, evals, res, mapping, oracle, router, batch_size, ranks, torch_dtype, out,
                       identity) -> dict:  # fmt: skip
    """Perplexity (router, oracle, expert load) layer by layer: one decoder layer resident per rank."""
    from dive_ds.eval.streamed import streamed_report
    from dive_ds.io.layers import ModelLayers
    from dive_ds.io.loading import checkpoint_shapes
    from dive_ds.models.moe import count_parameters

    t0 = time.time()
    layers = ModelLayers(model_dir)
    if layers.is_moe:
        res["params"] = count_parameters(layers.config)
    else:
        n = sum(math.prod(s) for s in checkpoint_shapes(model_dir).values())
        res["params"] = {"total": n, "activated": n}
    found = streamed_report(
        layers, evals, router=router or not oracle, oracle=mapping if oracle else None,
        expected=mapping, ranks=ranks, dtype=torch_dtype, batch_size=batch_size,
    )  # fmt: skip
    if "oracle" in found:
        found["oracle_map"] = mapping
    res |= found
    res |= _tail(res, evals, t0, ranks, torch_dtype, "streamed")
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
