"""Downstream accuracy through lm-evaluation-harness: the offline tasks, their exclusions, the HFLM adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dive_ds.data import demo_pack
from dive_ds.data.demo_readers import read_quartz
from dive_ds.eval import offline_tasks
from dive_ds.eval.downstream import hflm, resolve_tasks
from dive_ds.eval.offline_tasks import (
    OFFLINE_TASKS,
    build_offline_tasks,
    check_disjoint_from_demo_packs,
    evals_dir,
    read_items,
)
from dive_ds.eval.paired import wilson_interval
from dive_ds.eval.perplexity import window_nll
from tests.fixtures.procs import cli, one_line_error
from tests.fixtures.tiny import bpe_tokenizer, make_tiny_calibration, random_moe, tiny_moe_config


def test_offline_items_are_parsed_from_the_evals_wheel():
    logiqa, medmcqa = list(read_items("dive_logiqa")), list(read_items("dive_medmcqa"))
    # evals' logiqa.jsonl holds its 677 items twice (1,354 rows); repeats are dropped
    assert (len(logiqa), len(medmcqa)) == (677, 300)
    first = logiqa[0]
    assert first["context"].startswith("The company sent Zhang, Wang, Li and Zhao to Changsha")
    assert first["options"][0] == "Zhao chose to travel by car."  # evals' inner "A." dropped
    assert first["label"] == "c" and all(len(x["options"]) == 4 for x in logiqa)
    assert medmcqa[0]["opc"] == "Atrophy" and medmcqa[0]["cop"] == 2
    assert {x["cop"] for x in medmcqa} == {0, 1, 2, 3}


def test_offline_tasks_share_no_text_with_the_demo_packs(monkeypatch):
    check_disjoint_from_demo_packs()  # no offered task reads a pack's source file
    quartz = demo_pack.SOURCES["science_quartz"].path
    monkeypatch.setitem(OFFLINE_TASKS, "dive_quartz", OFFLINE_TASKS["dive_logiqa"].__class__(
        quartz, offline_tasks.parse_logiqa, {}, 2, "QuaRTz"))  # fmt: skip
    with pytest.raises(RuntimeError, match="dive_quartz reads registry/data/quartz/samples.jsonl"):
        check_disjoint_from_demo_packs()
    monkeypatch.delitem(OFFLINE_TASKS, "dive_quartz")

    # why QuaRTz is not offered: the demo pack holds every one of its items, stated with the answer
    qfile = evals_dir() / quartz
    statements = set(read_quartz(qfile))
    docs = set(demo_pack.collect_documents(read_quartz(qfile), demo_pack.DEFAULT_MAX_CHARS))
    assert len(statements) > 3800 and statements <= docs

    # and the offered items are nowhere in the pack text read from the same wheel (other packages'
    # domains are Wikipedia dumps, news, CHAMP math, Shakespeare, code, licences, the Bible)
    evals_domains = [n for n, s in demo_pack.SOURCES.items() if s.distribution == "evals"]
    text = " ".join(
        " ".join(demo_pack.SOURCES[n].reader(evals_dir() / demo_pack.SOURCES[n].path)) for n in evals_domains
    )
    text = " ".join(text.split())
    probes = [" ".join(x["context"].split())[:80] for x in read_items("dive_logiqa")]
    probes += [" ".join(x["question"].split())[:60] for x in read_items("dive_medmcqa")]
    assert len(evals_domains) == 4 and not [p for p in probes if p in text]


def test_task_names_are_refused_in_one_line_before_loading(capsys):
    # the model path does not exist: the task check must come first
    assert cli(["evaluate", "/nonexistent/model", "--tasks", "dive_quartz"], capsys) == 2
    assert "not offered: every QuaRTz item" in one_line_error(capsys)
    assert cli(["evaluate", "/nonexistent/model", "--tasks", "dive_logiqa,dive_logica"], capsys) == 2
    assert "unknown offline task(s) 'dive_logica'" in one_line_error(capsys)
    assert cli(["evaluate", "/nonexistent/model", "--tasks", " , "], capsys) == 2
    assert "names no task" in one_line_error(capsys)
    assert cli(["evaluate", "/nonexistent/model"], capsys) == 2
    assert "nothing to evaluate" in one_line_error(capsys)


def test_built_tasks_load_in_lm_eval_and_are_cached(tmp_path):
    from lm_eval.tasks.logiqa.utils_logiqa import doc_to_text

    out = build_offline_tasks(tmp_path / "tasks")
    manifest = json.loads((out / "tasks.json").read_text())
    assert {n: t["items"] for n, t in manifest["tasks"].items()} == {
        "dive_logiqa": 677,
        "dive_medmcqa": 300,
        "dive_lambada": 228,
    }
    assert manifest["tasks"]["dive_lambada"]["source"]["recipe"]["split"]["seed"] == 42
    assert "dive_quartz" in manifest["excluded"]
    stamp = (out / "dive_logiqa.jsonl").stat().st_mtime_ns
    assert build_offline_tasks(out) == out and (out / "dive_logiqa.jsonl").stat().st_mtime_ns == stamp

    tm, names = resolve_tasks(["dive_*"], out)  # lm-eval's glob patterns work
    assert names == ["dive_lambada", "dive_logiqa", "dive_medmcqa"]  # lm-eval sorts a pattern's matches
    tasks = tm.load(names)["tasks"]
    logiqa, medmcqa = tasks["dive_logiqa"], tasks["dive_medmcqa"]
    doc = logiqa.test_docs()[0]
    assert logiqa.doc_to_text(doc) == doc_to_text(doc)  # lm-eval's own logiqa prompt
    assert logiqa.doc_to_target(doc) == 2 and logiqa.doc_to_choice(doc)[2] == "Li chose to travel by ship."
    doc = medmcqa.test_docs()[0]
    assert medmcqa.doc_to_text(doc).endswith("C. Atrophy\nD. Dyplasia\nAnswer:")
    assert medmcqa.doc_to_target(doc) == 2 and medmcqa.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert (len(logiqa.test_docs()), len(medmcqa.test_docs())) == (677, 300)
    lambada = tasks["dive_lambada"]  # context = the passage less its last word, target = " " + that word
    doc = lambada.test_docs()[0]
    assert lambada.OUTPUT_TYPE == "loglikelihood" and lambada.doc_to_target(doc) == doc["target"] == " God"
    assert lambada.doc_to_text(doc) == doc["context"] and doc["context"].endswith("and I will be their")


@pytest.mark.parametrize(("p", "n"), [(0.3, 50), (0.0, 40), (1.0, 7), (0.62, 677)])
def test_wilson_interval_solves_its_defining_equation(p, n):
    z = 1.959964
    lo, hi = wilson_interval(p, n)
    assert 0.0 <= lo <= p <= hi <= 1.0
    for end in (lo, hi):  # the Wilson bounds are the p0 with |p - p0| = z sqrt(p0 (1 - p0) / n)
        assert abs(abs(p - end) - z * math.sqrt(end * (1 - end) / n)) < 1e-9
    assert wilson_interval(0.3, 50) == pytest.approx((0.19104, 0.43750), abs=1e-5)


def test_adapter_loglikelihood_equals_the_projects_nll(tmp_path):
    """lm-eval's HFLM around a loaded dive_moe scores a continuation exactly as dive_ds's own window NLL."""
    from lm_eval.api.instance import Instance

    from dive_ds.io.loading import load_causal_lm, load_tokenizer

    tok = bpe_tokenizer(tmp_path)
    random_moe(
        tiny_moe_config(vocab_size=len(tok), num_local_experts=4, num_experts_per_tok=2), seed=3
    ).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path, dtype=torch.float32).eval()
    tok = load_tokenizer(tmp_path, model.config)
    pairs = [
        ("the cat sat on the", " mat."),
        ("which animal is larger? the", " elephant is larger than the mouse."),
        ("the elephant", " sat on the cat, which is larger than the mat? the mouse."),
        ("mouse", " the"),
    ]
    lm = hflm(model, tok, batch_size=3)  # two batches, right-padded to different lengths
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (ctx, cont), (logprob, _) in zip(pairs, got):
        whole, head = tok(ctx + cont)["input_ids"], tok(ctx)["input_ids"]
        assert whole[: len(head)] == head and len(whole) > len(head)  # a clean token boundary
        nll_whole, _ = window_nll(model, torch.tensor([whole]))
        nll_head, _ = window_nll(model, torch.tensor([head]))
        assert -logprob == pytest.approx(nll_whole - nll_head, rel=1e-5, abs=1e-4), (ctx, cont)
    assert len({round(lp, 3) for lp, _ in got}) == len(pairs)  # not a constant


def test_evaluate_writes_perplexities_and_accuracies_side_by_side(tmp_path, capsys, monkeypatch):
    """--calib and --tasks together (tiny dense model): one eval.json, eval.md with both tables, TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("DIVE_DS_CACHE", str(tmp_path / "cache"))  # the offline tasks are built there
    tok = bpe_tokenizer(tmp_path / "tok")
    model_dir, calib = make_tiny_calibration(tmp_path, vocab_size=len(tok), max_position_embeddings=512)
    tok.save_pretrained(model_dir)
    out = tmp_path / "eval"
    argv = ["evaluate", str(model_dir), "--calib", str(calib), "--tasks", "dive_medmcqa", "--limit", "5"]
    assert cli([*argv, "--out", str(out)], capsys) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["router"]) == {"dom0", "dom1", "dom2", "dom3"} and res["tasks"]["dive_medmcqa"]["n"] == 5
    assert (tmp_path / "cache" / "lm_eval_tasks" / "tasks.json").is_file()
    md = (out / "eval.md").read_text()
    assert "| model | routing | dom0 |" in md and "| dive_medmcqa | 5 |" in md
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert acc.Scalars("eval/ppl_router_mean")[0].value == pytest.approx(res["router_mean"], rel=1e-6)
    assert acc.Scalars("downstream/dive_medmcqa/acc")[0].value == pytest.approx(
        res["tasks"]["dive_medmcqa"]["acc"]
    )


@pytest.mark.slow
def test_offline_task_end_to_end_on_the_demo_model(tmp_path, capsys):
    """`dive-ds evaluate demo --tasks dive_medmcqa`: the real SmolLM2 model, lm-eval's HFLM, 40 items."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval"
    assert (
        cli(["evaluate", "demo", "--tasks", "dive_medmcqa", "--limit", "40", "--out", str(out)], capsys) == 0
    )
    res = json.loads((out / "eval.json").read_text())
    t = res["tasks"]["dive_medmcqa"]
    assert t["n"] == 40 and t["num_fewshot"] == 0 and t["chance"] == 0.25
    assert abs(t["acc"] * 40 - round(t["acc"] * 40)) < 1e-9  # a count of right answers out of 40
    lo, hi = t["acc_ci95"]
    assert lo <= t["acc"] <= hi and 0.2 < hi - lo < 0.35  # ~ +-0.14 at n = 40
    assert t["acc_stderr"] == pytest.approx(math.sqrt(t["acc"] * (1 - t["acc"]) / 39), rel=1e-6)
    assert res["lm_eval"]["version"] == "0.4.13" and res["lm_eval"]["limit"] == 40
    assert "| dive_medmcqa | 40 |" in (out / "eval.md").read_text()
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert acc.Scalars("downstream/dive_medmcqa/acc")[0].value == pytest.approx(t["acc"])
    printed = capsys.readouterr().out
    print(f"dive_medmcqa (first 40 items), dense demo model: acc {t['acc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    assert "dive_medmcqa" in printed
