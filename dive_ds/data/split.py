"""Every domain's text split once, by seed, into four disjoint sets: calibration, selection, training,
evaluation.

- calibration: the channel statistics and the router fit (`calibrate`, `fit-router`);
- selection: whatever is chosen on held-out text before evaluation: mining's D x D pruned
  evaluations, the calibration folder's held-out windows;
- training: the retraining stream (`train/data.py`);
- evaluation: what methods are judged on (`compare`, `evaluate --domains`, the trainer's eval curve,
  the LAMBADA-style task).

The unit of the split is the document: a document of at most `doc_chars` characters goes to one set
whole, so nearby text of one article or source file never sits in two sets. A longer document (a
play, a novel, a very long file) is cut into contiguous spans of about `span_chars` characters (at the
last newline, else space, in the second half of the span; else a hard cut), each span in its own set:
a domain of a few long documents is split by contiguous spans within documents. A unit's set is a
function of the seed and the unit's text alone (sha256), so:
- the split is reproducible from the seed, with no state and no need to read the whole domain
  (a streamed hub dataset splits the same way as a local file);
- two equal spans, wherever they occur, fall in the same set: duplicated text cannot leak.
Consecutive spans of one document in the same set are joined back into one segment (the original
text, contiguous), so windows may cross span boundaries within a set but never across sets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

ROLES = ("calib", "select", "train", "eval")


@dataclass(frozen=True)
class SplitConfig:
    """How each domain's text is divided into the four disjoint sets."""

    seed: int = 42
    """The split's seed; fixed across training seeds so evaluation text never moves."""
    calib: float = 0.4
    """Share of spans for calibration statistics and router fitting."""
    select: float = 0.1
    """Share for selection (mining's pruned evaluations, the calibration's held-out windows)."""
    train: float = 0.4
    """Share for the training stream."""
    eval: float = 0.1
    """Share for evaluation."""
    span_chars: int = 4096
    """Characters per span of a document longer than `doc_chars`."""
    doc_chars: int = 65536
    """Documents up to this long go to one set whole; longer ones are split by spans."""

    def __post_init__(self):
        shares = [self.calib, self.select, self.train, self.eval]
        if any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-9:
            raise ValueError(
                f"split shares calib/select/train/eval = {shares} must be > 0 and sum to 1; fix split.*"
            )
        if self.span_chars < 64 or self.doc_chars < self.span_chars:
            raise ValueError(
                f"split.span_chars {self.span_chars}, doc_chars {self.doc_chars}: use 64 <= span_chars <= doc_chars"
            )

    def share(self, role: str) -> float:
        return getattr(self, role)


def spans(text: str, span_chars: int) -> list[str]:
    """`text` cut into contiguous pieces of at most `span_chars` (joined back, they are `text`)."""
    out, start, n = [], 0, len(text)
    while n - start > span_chars:
        end = start + span_chars
        cut = text.rfind("\n", start + span_chars // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + span_chars // 2, end)
        end = cut + 1 if cut >= 0 else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def span_id(text: str) -> str:
    """A span's identity: the first 16 hex digits of its text's sha256 (recorded in the outputs)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def role_of(text: str, cfg: SplitConfig) -> str:
    """The set a span belongs to: a uniform draw from sha256(seed, text), cut at the cumulative shares."""
    h = hashlib.sha256(f"{cfg.seed}\0".encode() + text.encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    acc = 0.0
    for role in ROLES:
        acc += cfg.share(role)
        if u < acc:
            return role
    return ROLES[-1]


@dataclass(frozen=True)
class Segment:
    """Contiguous text of one document, all of it in one set."""

    doc: int
    """The document's index in the domain's stored order."""
    first_span: int
    text: str
    ids: tuple[str, ...]
    """The span ids it is made of."""


def _doc_segments(d: int, doc: str, cfg: SplitConfig) -> Iterator[tuple[str, Segment]]:
    """(role, segment) of one document: the whole document (up to doc_chars), else runs of consecutive
    spans in the same set."""
    if len(doc) <= cfg.doc_chars:
        pieces = spans(doc, cfg.span_chars)
        yield role_of(doc, cfg), Segment(d, 0, doc, tuple(span_id(p) for p in pieces))
        return
    run: list[str] = []
    run_role, first = "", 0
    for s, piece in enumerate(spans(doc, cfg.span_chars) + [None]):
        role = None if piece is None else role_of(piece, cfg)
        if run and role != run_role:
            yield run_role, Segment(d, first, "".join(run), tuple(span_id(p) for p in run))
            run = []
        if piece is not None:
            if not run:
                run_role, first = role, s
            run.append(piece)


def segments(docs: Iterable[str], cfg: SplitConfig, role: str) -> Iterator[Segment]:
    """The segments of `role`, in stored order (streaming: one document at a time)."""
    if role not in ROLES:
        raise ValueError(f"unknown split role {role!r}; choose one of {ROLES}")
    for d, doc in enumerate(docs):
        yield from (seg for r, seg in _doc_segments(d, doc, cfg) if r == role)


def split_texts(docs: Iterable[str], cfg: SplitConfig) -> dict[str, list[Segment]]:
    """Every role's segments of one domain (reads `docs` once)."""
    out: dict[str, list[Segment]] = {r: [] for r in ROLES}
    for d, doc in enumerate(docs):
        for r, seg in _doc_segments(d, doc, cfg):
            out[r].append(seg)
    return out


def record(segs: list[Segment]) -> dict:
    """What an output records of one set of one domain: its span ids and size."""
    ids = [i for s in segs for i in s.ids]
    return {"spans": len(ids), "chars": sum(len(s.text) for s in segs), "ids": ids}
