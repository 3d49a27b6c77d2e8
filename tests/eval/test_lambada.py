"""The LAMBADA-style task (dive_lambada): items from the evaluation split only, deterministic for a seed,
scores equal to a hand computation, and lm-eval's loglikelihood path agrees with the project's own."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dive_ds.data.split import ROLES, SplitConfig, record, split_texts
from dive_ds.eval.lambada import (
    NARRATIVE_BOOKS,
    LambadaConfig,
    build_items,
    encode_item,
    lambada_scores,
    load_items,
    qualifies,
)


def _check_eval_only(items: list[dict], docs_by_domain: dict[str, list[str]], split: SplitConfig) -> None:
    """Every item's passage sits, at its recorded offset, in an evaluation segment made of its recorded
    spans, and in no calibration, selection or training segment."""
    for name, docs in docs_by_domain.items():
        parts = split_texts(docs, split)
        ids = {r: set(record(parts[r])["ids"]) for r in ROLES}
        others = [s.text for r in ROLES if r != "eval" for s in parts[r]]
        by_first = {s.ids[0]: s for s in parts["eval"]}
        mine = [it for it in items if it["domain"] == name]
        for it in mine:
            passage = it["context"] + it["target"]
            seg = by_first[it["id"].split(":")[1]]
            assert seg.doc == it["doc"]
            assert seg.text[it["offset"] : it["offset"] + len(passage)] == passage
            assert set(it["span_ids"]) <= set(seg.ids) and set(it["span_ids"]) <= ids["eval"]
            assert not set(it["span_ids"]) & (ids["calib"] | ids["select"] | ids["train"])
            assert not [t for t in others if passage in t]
            assert it["target"][0] == " " and it["target"][1:].isalpha() and " " not in it["target"][1:]


def _synthetic_docs(n_docs: int = 24, seed: int = 0) -> list[str]:
    """Plain narrative-like documents (no titles): lines of random sentences over a small vocabulary."""
    rng = random.Random(seed)
    names = ["Abner", "Miriam", "Gideon", "Tamar", "Jethro", "Boaz", "Hagar", "Elkanah"]
    things = ["river", "lamp", "sheep", "sword", "garden", "wall", "cloak", "stone", "field", "bread"]
    verbs = ["carried", "found", "saw", "buried", "kept", "mended", "sold", "fetched"]
    fill = ["and", "then", "the", "old", "a", "small", "near", "by", "with", "again"]
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(30, 60)):
            words = [rng.choice(names), rng.choice(verbs)]
            words += [rng.choice(fill + things + names) for _ in range(rng.randint(6, 18))]
            lines.append(" ".join(words) + rng.choice([".", ".", "?", ",", ";"]))
        docs.append("\n".join(lines))
    return docs


_SPLIT = SplitConfig(seed=5, span_chars=400, calib=0.3, select=0.1, train=0.3, eval=0.3)
"""Small spans (each synthetic document is cut into ~10, of all four sets) and a large evaluation share."""


def test_items_lie_in_the_evaluation_set_only_synthetic():
    """Small spans (every document is cut into many, of all four sets): passages never cross into another set."""
    split = _SPLIT
    docs = {"a": _synthetic_docs(40, 0), "b": _synthetic_docs(20, 1)}
    cfg = LambadaConfig(
        domains=("a", "b"), books=None, context_words=(10, 30), max_context_words=60, split=split
    )
    items = build_items(docs, cfg)
    assert len(items) > 100 and {it["domain"] for it in items} == {"a", "b"}
    _check_eval_only(items, docs, split)
    assert all(20 >= len(it["span_ids"]) >= 1 for it in items) and any(
        len(it["span_ids"]) > 1 for it in items
    )
    n_words = [len(it["context"].split()) for it in items]
    assert min(n_words) >= 10 and max(n_words) <= 60


def test_kjv_items_lie_in_the_evaluation_set_only():
    """The shipped task: the narrative KJV books of the unseen pack, evaluation set only, decontaminated."""
    from dive_ds.data.registry import iter_documents, load_registry

    cfg = LambadaConfig()
    reg = load_registry(cfg.registry)
    docs = {d.name: list(iter_documents(d)) for d in reg.select(list(cfg.domains))}
    items = build_items(docs, cfg)
    assert len(items) == 228  # 170 Old Testament + 58 New Testament (split seed 42, task seed 1234)
    assert {it["title"] for it in items} <= set(NARRATIVE_BOOKS)
    _check_eval_only(items, docs, cfg.split)
    # no title line in a context; every target qualifies (content word, repeated outside its sentence)
    assert not [it for it in items if any(it["context"].startswith(b + " ") for b in NARRATIVE_BOOKS)]
    assert all(qualifies(it["target"][1:], it["context"], cfg) for it in items)
    assert items == load_items(cfg)  # the registry path reads the same documents


def test_items_are_deterministic_for_a_seed():
    docs = {"a": _synthetic_docs(40, 0)}
    base = dict(domains=("a",), books=None, context_words=(10, 30), max_context_words=60, split=_SPLIT)
    first = build_items(docs, LambadaConfig(seed=7, **base))
    assert first == build_items(docs, LambadaConfig(seed=7, **base))
    other = build_items(docs, LambadaConfig(seed=8, **base))
    assert other != first  # other passage lengths, on the same evaluation set
    assert {s for it in other for s in it["span_ids"]} <= set(
        record(split_texts(docs["a"], base["split"])["eval"])["ids"]
    )
    sub = build_items(docs, LambadaConfig(seed=7, max_items=20, **base))
    assert len(sub) == 20 and sub == build_items(docs, LambadaConfig(seed=7, max_items=20, **base))
    assert all(it in first for it in sub) and [first.index(it) for it in sub] == sorted(
        first.index(it) for it in sub
    )
    assert len(first) > 40 and sub != build_items(docs, LambadaConfig(seed=9, max_items=20, **base))


def test_target_filter():
    cfg = LambadaConfig()
    ctx = "And Gideon took the lamp.\nAnd he went down unto the river, and he took the"
    assert qualifies("lamp", ctx, cfg)  # in an earlier sentence
    assert not qualifies("river", ctx, cfg)  # only in its own sentence
    assert not qualifies("Gideon", "Gideon went out, and he called", cfg)  # own sentence
    assert not qualifies("the", ctx, cfg) and not qualifies("unto", ctx, cfg)  # stopwords
    assert not qualifies("ox", "An ox. He saw the", cfg)  # shorter than 3 letters
    assert qualifies("river", ctx, LambadaConfig(require_repeat=False))
    with pytest.raises(ValueError, match="context_words"):
        LambadaConfig(context_words=(50, 10))


# --------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------

_VOCAB = ["a", "b", " "]
# P(next | previous) of a bigram model over the three characters (rows: previous a, b, space)
_P = [[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]]


class _CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [_VOCAB.index(c) for c in text]


class _Bigram(nn.Module):
    """logits = log P(next | this token): log_softmax gives back the table exactly."""

    def __init__(self):
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(_P, dtype=torch.float64).log().float())

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logp[input_ids])


def test_scores_equal_a_hand_computation():
    items = [
        {"context": "ab", "target": " a"},  # P(' '|b) .6 best, P(a|' ') .5 best: right, p = .30
        {"context": "ba", "target": " b"},  # P(' '|a) .3, but b (.6) is greedy: wrong, p = .3 * .4 = .12
        {"context": "a", "target": "b b"},  # .6 best, .6 best, P(b|' ') .4 < .5: wrong, p = .144
        {"context": "b", "target": " a"},  # .6 best, .5 best: right, p = .30
    ]
    tok = _CharTokenizer()
    assert encode_item(tok, "a", "b b") == ([0], [1, 2, 1])
    for bs in (1, 3):
        r = lambada_scores(_Bigram(), tok, items, batch_size=bs)
        assert r["correct"] == [True, False, False, True] and r["n"] == 4 and r["acc"] == 0.5
        probs = [0.6 * 0.5, 0.3 * 0.4, 0.6 * 0.6 * 0.4, 0.6 * 0.5]
        assert r["nll"] == pytest.approx([-math.log(p) for p in probs], rel=1e-6)
        assert r["ppl"] == pytest.approx((0.3 * 0.12 * 0.144 * 0.3) ** -0.25, rel=1e-6)  # per target word
        assert r["ppl_token"] == pytest.approx((0.3 * 0.12 * 0.144 * 0.3) ** (-1 / 9), rel=1e-6)  # 9 tokens
        assert r["target_tokens"] == [2, 2, 3, 2]
        assert r["acc_stderr"] == pytest.approx(math.sqrt(1 / 12), rel=1e-9)  # sample sd 0.577 / sqrt(4)
        lo, hi = r["acc_ci95"]
        assert lo < 0.5 < hi and r["ids"] == [0, 1, 2, 3]


def test_scores_agree_with_lm_eval(tmp_path, monkeypatch):
    """The same items through lm-eval (task YAML + HFLM on a tiny Llama) and through `lambada_scores`:
    per item the same target log-likelihood and greedy flag, so the same acc and ppl. Contexts are
    longer than the model's 128 positions (both left-truncate), and half the targets are the model's own
    greedy next token, so that accuracy is not trivially 0."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dive_ds.eval.downstream import hflm, summarise
    from dive_ds.eval.offline_tasks import write_task
    from dive_ds.io.loading import load_causal_lm, load_tokenizer
    from tests.fixtures.tiny import bpe_tokenizer, save_tiny_llama

    docs = {"a": _synthetic_docs(24, 0)}
    cfg = LambadaConfig(domains=("a",), books=None, context_words=(60, 100), max_context_words=140,
                        split=SplitConfig(seed=5, span_chars=1500), max_items=10)  # fmt: skip
    items = build_items(docs, cfg)
    tok = bpe_tokenizer(tmp_path / "model")
    save_tiny_llama(tmp_path / "model", seed=1, vocab_size=len(tok))
    model = load_causal_lm(tmp_path / "model", dtype=torch.float32).eval()
    tok = load_tokenizer(tmp_path / "model", model.config)
    greedy = []
    for it in items:  # the model's own next token as a target, when it re-encodes as one token
        head = tok.encode(it["context"])
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([head[-128:]])).logits[0, -1].argmax())
        target = tok.decode([nxt])
        if target.strip() and tok.encode(it["context"] + target) == head + [nxt]:
            greedy.append(it | {"id": it["id"] + ":greedy", "target": target})
    items = items + greedy
    assert len(items) >= 14 and max(len(tok.encode(it["context"])) for it in items) > 128

    ours = lambada_scores(model, tok, items, batch_size=3)
    assert 0 < ours["acc"] < 1

    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", "dive_lambada", items)
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's perplexity bootstrap in this process
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    res = simple_evaluate(model=hflm(model, tok, batch_size=4), tasks=["dive_lambada"], task_manager=tm,
                          log_samples=True, bootstrap_iters=100)  # fmt: skip
    samples = sorted(res["samples"]["dive_lambada"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == ours["ids"]
    for s, nll, right in zip(samples, ours["nll"], ours["correct"]):
        (ll, greedy_ok), *_ = s["resps"][0]
        assert -float(ll) == pytest.approx(nll, rel=1e-5, abs=1e-4) and bool(greedy_ok) == right
    summary = summarise(res)["dive_lambada"]
    assert summary["n"] == len(items) and summary["acc"] == pytest.approx(ours["acc"], abs=1e-12)
    assert summary["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)
    assert summary["acc_stderr"] == pytest.approx(ours["acc_stderr"], rel=1e-9)
    assert summary["ppl_stderr"] > 0  # lm-eval's bootstrap ran
