"""The four-way split: disjoint by construction, reproducible from the seed, spans within long documents."""

import json
from pathlib import Path

import pytest

from dive_ds.data.registry import iter_documents, load_registry
from dive_ds.data.split import ROLES, SplitConfig, role_of, segments, span_id, spans, split_texts


def _sets(docs, cfg):
    parts = split_texts(docs, cfg)
    return {r: {i for s in parts[r] for i in s.ids} for r in ROLES}, parts


def _assert_disjoint_and_complete(docs, cfg):
    ids, parts = _sets(docs, cfg)
    for a in ROLES:
        for b in ROLES:
            if a < b:
                assert not ids[a] & ids[b], (a, b)
    every = {span_id(p) for d in docs for p in spans(d, cfg.span_chars)}
    assert set().union(*ids.values()) == every  # every span is somewhere
    # segments are contiguous text of their document
    for r in ROLES:
        for s in parts[r]:
            assert s.text in docs[s.doc]
    return ids, parts


def test_spans_rejoin_and_cut_at_line_ends():
    text = "".join(f"line {i} " * 7 + "\n" for i in range(500))
    pieces = spans(text, 1000)
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces) and all(p.endswith("\n") for p in pieces[:-1])
    assert spans("x" * 2500, 1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no break: a hard cut


def test_role_shares_and_seed():
    cfg = SplitConfig(seed=3)
    texts = [f"document number {i}" for i in range(20_000)]
    roles = [role_of(t, cfg) for t in texts]
    for r in ROLES:  # binomial: 20k draws, 4 standard deviations
        share = roles.count(r) / len(roles)
        sd = (cfg.share(r) * (1 - cfg.share(r)) / len(roles)) ** 0.5
        assert abs(share - cfg.share(r)) < 4 * sd, (r, share)
    assert roles == [role_of(t, SplitConfig(seed=3)) for t in texts]  # reproducible
    other = [role_of(t, SplitConfig(seed=4)) for t in texts]
    assert sum(a != b for a, b in zip(roles, other)) > 10_000  # another seed, another split


def test_equal_text_falls_in_one_set():
    cfg = SplitConfig(span_chars=100, doc_chars=100)
    docs = ["a" * 99, "b " * 300, "a" * 99]
    parts = split_texts(docs, cfg)
    where = [r for r in ROLES for s in parts[r] if s.text == "a" * 99]
    assert len(where) == 2 and where[0] == where[1]


def test_long_documents_split_by_spans():
    """A domain of two long documents (a play) still reaches every set, by contiguous spans."""
    docs = ["".join(f"ACT {a} line {i}: words words words\n" for i in range(3000)) for a in range(2)]
    cfg = SplitConfig(span_chars=1024, doc_chars=4096)
    ids, parts = _assert_disjoint_and_complete(docs, cfg)
    assert all(parts[r] for r in ROLES)
    assert list(segments(docs, cfg, "eval")) == parts["eval"]


def test_documents_up_to_doc_chars_go_whole():
    """Nearby text of one article or file never sits in two sets; only longer documents are cut."""
    cfg = SplitConfig(span_chars=100, doc_chars=1000)
    docs = ["".join(f"line {i} of doc {d}\n" for i in range(50)) for d in range(40)]  # ~800 chars each
    parts = split_texts(docs, cfg)
    for d, doc in enumerate(docs):
        homes = [(r, s) for r in ROLES for s in parts[r] if s.doc == d]
        assert len(homes) == 1 and homes[0][1].text == doc  # whole, in one set
    long = ["".join(f"line {i}\n" for i in range(2000))]  # ~17k chars: cut into spans
    assert sum(len(parts) for parts in split_texts(long, cfg).values()) > 1


def test_shares_must_sum_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(calib=0.5, select=0.1, train=0.4, eval=0.1)


def test_demo_pack_sets_are_disjoint():
    """The four sets of every demo-pack domain are disjoint and cover it, for the default split."""
    reg = load_registry("demo")
    for d in reg.domains.values():
        docs = list(iter_documents(d, max_chars=600_000))
        ids, parts = _assert_disjoint_and_complete(docs, SplitConfig())
        assert all(parts[r] for r in ROLES), d.name


def test_local_registry_sets_are_disjoint(tmp_path: Path):
    rows = [json.dumps({"text": f"record {i}: " + "some words here " * (i % 50 + 1)}) for i in range(400)]
    (tmp_path / "a.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "long.txt").write_text("".join(f"a long story, line {i}\n" for i in range(20_000)))
    (tmp_path / "reg.yaml").write_text(
        "version: 1\ndomains:\n"
        "  records: {source: {type: local, files: [a.jsonl]}}\n"
        "  story: {source: {type: local, files: [long.txt]}}\n"
    )
    reg = load_registry(tmp_path / "reg.yaml")
    for d in reg.domains.values():
        docs = list(iter_documents(d))
        ids, parts = _assert_disjoint_and_complete(docs, SplitConfig(seed=11))
        assert all(parts[r] for r in ROLES), d.name
        again, _ = _sets(list(iter_documents(d)), SplitConfig(seed=11))
        assert again == ids
