"""Downstream accuracy through lm-evaluation-harness (`lm_eval`, pinned in setup.cfg).

The model is the one dive_ds loads (dense or dive_moe, strictly: no weight left random); lm-eval's
own Hugging Face wrapper (`HFLM`) scores it, and lm-eval's `simple_evaluate` runs the tasks. Task
names pass through to lm-eval's `TaskManager`: any task or group lm-eval knows (its datasets come
from the Hugging Face hub, so online), plus the offline tasks of `dive_ds.eval.offline_tasks`.

Per task the summary keeps lm-eval's accuracy (`acc`), length-normalised accuracy (`acc_norm`)
and their standard errors, and adds a 95% Wilson score interval from the item count; for a
LAMBADA-style task (`dive_lambada`, lm-eval's `lambada_openai`) also the target-word perplexity
(`ppl`, lm-eval's `perplexity`, with its bootstrap standard error).
"""

from __future__ import annotations

import fnmatch
import glob
from pathlib import Path

from dive_ds.eval.offline_tasks import EXCLUDED, OFFLINE_TASKS, build_offline_tasks
from dive_ds.eval.paired import wilson_interval

METRICS = ("acc", "acc_norm")

BOOTSTRAP_ITERS = 1000
"""lm-eval's bootstrap draws for the perplexity's standard error (its default, 100,000, takes minutes on
few cores; the accuracies' standard errors are closed-form and do not use it)."""


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--tasks {spec!r} names no task; pass e.g. --tasks {','.join(OFFLINE_TASKS)}")
    return list(dict.fromkeys(names))


def resolve_tasks(names: list[str], tasks_dir: Path | None = None):
    """(an lm-eval TaskManager, the task names it will run) for `names`, as lm-eval's CLI reads them:
    task, group or tag names, glob patterns of them, or task YAML files. Names that match nothing stop
    with one ValueError naming them, before any model is loaded. lm-eval's own task index (~15k YAML
    files, tens of seconds) is read only when a name is not an offline task. The tasks' data is loaded
    here too, so that a hub dataset that cannot be fetched also stops in one line before the model."""
    from lm_eval.tasks import TaskManager

    for n in names:
        if n in EXCLUDED:
            raise ValueError(f"task {n} is not offered: {EXCLUDED[n]}; use {', '.join(OFFLINE_TASKS)}")
    ours = [n for n in names if n.startswith("dive_")]  # no lm-eval task is named so: no index needed
    unknown = [n for n in ours if not fnmatch.filter(OFFLINE_TASKS, n)]
    if unknown:
        raise ValueError(
            f"unknown offline task(s) {', '.join(map(repr, unknown))}: they are {', '.join(OFFLINE_TASKS)}"
        )
    online = [n for n in names if n not in ours]
    include = str(build_offline_tasks(tasks_dir)) if ours else None
    tm = TaskManager(include_path=include, include_defaults=bool(online))
    resolved, unknown = [], []
    for n in names:
        found = (
            [str(Path(f).absolute()) for f in sorted(glob.glob(n))]
            if n.endswith(".yaml")
            else tm.match_tasks([n])
        )
        resolved += [f for f in found if f not in resolved]
        if not found:
            unknown.append(n)
    if unknown:
        import lm_eval

        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}: offline tasks are {', '.join(OFFLINE_TASKS)}; "
            f"online, any task, group or tag of lm-eval {lm_eval.__version__} (`lm-eval ls tasks`), a glob "
            "pattern of them, or a task YAML file"
        )
    try:  # fetch (or read from the datasets cache) every task's data now, not after the model is loaded
        tm.load(resolved)
    except ConnectionError as e:
        raise ValueError(
            f"the data of task(s) {', '.join(resolved)} cannot be fetched ({e}); "
            f"offline, use {', '.join(OFFLINE_TASKS)}"
        ) from e
    return tm, resolved


def hflm(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around an already loaded causal LM (dense or dive_moe) and its tokenizer."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_length=max_length)  # fmt: skip


def summarise(results: dict) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` output -> {task: {n, acc, acc_stderr, acc_ci95, acc_norm, ..., ppl}}."""
    out = {}
    n_samples = results.get("n-samples", {})
    for task, row in results["results"].items():
        n = n_samples.get(task, {}).get("effective")
        entry: dict = {"n": n, "num_fewshot": results.get("n-shot", {}).get(task)}
        for m in METRICS:
            value = row.get(f"{m},none")
            if not isinstance(value, (int, float)):
                continue
            stderr = row.get(f"{m}_stderr,none")
            entry[m] = float(value)
            entry[f"{m}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
            if n:
                entry[f"{m}_ci95"] = list(wilson_interval(float(value), int(n)))
        ppl = row.get("perplexity,none")
        if isinstance(ppl, (int, float)):
            stderr = row.get("perplexity_stderr,none")
            entry["ppl"] = float(ppl)
            entry["ppl_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        if task in OFFLINE_TASKS and OFFLINE_TASKS[task].choices:
            entry["chance"] = 1 / OFFLINE_TASKS[task].choices
        if any(m in entry for m in METRICS):
            out[task] = entry
    return out


def run_tasks(lm, names: list[str], tm, limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """Run the tasks through lm-eval; returns {"tasks": summary, "lm_eval": settings and versions}."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    results = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)  # fmt: skip
    summary = summarise(results)
    if not summary:
        raise RuntimeError(
            f"lm-eval reported no acc or acc_norm for {', '.join(names)}; no multiple-choice task?"
        )
    return {
        "tasks": summary,
        "lm_eval": {
            "version": lm_eval.__version__,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "bootstrap_iters": BOOTSTRAP_ITERS,
            "task_versions": results.get("versions", {}),
        },
    }


def accuracy_table(results: list[dict]) -> str:
    """One row per (model, task): items, acc and acc_norm with their 95% intervals, chance, perplexity."""
    head = "| model | task | items | acc (95% CI) | acc_norm (95% CI) | chance | ppl |\n|---|---|---|---|---|---|---|\n"
    rows = []
    for r in results:
        for task, t in r.get("tasks", {}).items():
            cells = []
            for m in METRICS:
                ci = t.get(f"{m}_ci95")
                cells.append(
                    "" if m not in t else f"{t[m]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                )
            chance = f"{t['chance']:.2f}" if "chance" in t else ""
            ppl = f"{t['ppl']:.2f}" if "ppl" in t else ""
            rows.append(
                f"| {r['label']} | {task} | {t['n'] or ''} | {cells[0]} | {cells[1]} | {chance} | {ppl} |"
            )
    return head + "\n".join(rows) + "\n"


def write_tensorboard(folder: Path, res: dict, step: int = 0) -> None:
    """Scalars of one evaluation (accuracies, mean perplexities) as TensorBoard events in `folder`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for task, t in res.get("tasks", {}).items():
            for key in (*METRICS, *(f"{m}_stderr" for m in METRICS), "ppl"):
                if t.get(key) is not None:
                    writer.add_scalar(f"downstream/{task}/{key}", t[key], step)
        for key in ("router_mean", "oracle_mean"):
            if key in res:
                writer.add_scalar(f"eval/ppl_{key}", res[key], step)
    finally:
        writer.close()
