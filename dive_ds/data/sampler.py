"""Calibration and selection windows per domain (the reference recipe, made deterministic).

Every domain's documents are first split by `dive_ds.data.split` into four disjoint sets; this module
uses two of them:
1. calibration (`DomainSamples.calib`): documents of at least `seq_len` tokens give random windows;
   shorter ones are concatenated (separated by EOS) into one stream that is treated as a document;
   `n_samples` windows are drawn, each from a document chosen with probability proportional to its
   number of window positions, at a random start;
2. selection (`DomainSamples.eval`, the calibration folder's "held-out" windows): non-overlapping
   windows spread over the selection segments (`spread_windows`). Mining's pruned evaluations and
   the router fit's choices may look at them; no method is judged on them (that is the evaluation
   set, drawn by `evaluation_windows` from the evaluation segments).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dive_ds.data.split import SplitConfig, record, split_texts


@dataclass(frozen=True)
class SamplerConfig:
    """How calibration and evaluation windows are drawn from each domain."""

    samples_per_domain: int = 1024
    """N: calibration windows per domain (the reference recipe: 1024)."""
    seq_len: int = 256
    """L: tokens per window (the reference recipe: 256)."""
    eval_windows: int = 16
    """Held-out evaluation windows per domain (consecutive, non-overlapping)."""
    seed: int = 42
    """Seed for the window positions."""
    split: SplitConfig = SplitConfig()
    """The disjoint calibration / selection / training / evaluation split of every domain."""

    def __post_init__(self):
        if self.samples_per_domain < 1:
            raise ValueError(f"samples_per_domain must be >= 1 (got {self.samples_per_domain})")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (got {self.seq_len})")
        if self.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1 (got {self.eval_windows})")

    def chars_budget(self) -> int:
        """Characters to read per domain: generous for ~4 chars/token with room for a random pick,
        divided by the smaller of the calibration and selection shares of the split."""
        calib = 12 * self.samples_per_domain * self.seq_len / self.split.calib
        select = 12 * self.eval_windows * self.seq_len / self.split.select
        return int(max(400_000, calib, select))


@dataclass
class DomainSamples:
    calib: torch.Tensor
    """[N, L] int64 calibration windows."""
    eval: torch.Tensor
    """[n_eval, L] int64 selection windows (held out of calibration; see the module docstring)."""
    calib_pool_tokens: int
    """Tokens in the calibration set's pool."""
    documents: int
    split: dict | None = None
    """{calib, select: {spans, chars, ids}}: the span ids of the split the windows came from."""


def spread_windows(docs: list[list[int]], n: int, seq_len: int, eos: int) -> torch.Tensor:
    """Up to `n` non-overlapping windows spread over the documents: the first window of every document
    (in order), then every second one, ...; documents shorter than `seq_len` are EOS-joined into one
    stream treated as a document (placed last). -> [min(n, available), seq_len] int64."""
    pool = calibration_pool(docs, seq_len, eos)
    per_doc = [[d[i * seq_len : (i + 1) * seq_len] for i in range(len(d) // seq_len)] for d in pool]
    out: list[list[int]] = []
    k = 0
    while len(out) < n and any(k < len(w) for w in per_doc):
        out.extend(w[k] for w in per_doc if k < len(w))
        k += 1
    out = out[:n]
    return torch.tensor(out, dtype=torch.long).view(len(out), seq_len)


def calibration_pool(docs: list[list[int]], seq_len: int, eos: int) -> list[list[int]]:
    """Long documents as they are; short ones concatenated with EOS into one stream."""
    long = [d for d in docs if len(d) >= seq_len]
    short_stream: list[int] = []
    for d in docs:
        if len(d) < seq_len:
            short_stream.extend(d)
            short_stream.append(eos)
    if len(short_stream) >= seq_len:
        long.append(short_stream)
    return long


def draw_windows(pool: list[list[int]], n: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    positions = np.array([len(d) - seq_len + 1 for d in pool], dtype=np.float64)
    which = rng.choice(len(pool), size=n, p=positions / positions.sum())
    out = torch.empty(n, seq_len, dtype=torch.long)
    for row, i in enumerate(which):
        start = int(rng.integers(0, len(pool[i]) - seq_len + 1))
        out[row] = torch.tensor(pool[i][start : start + seq_len])
    return out


def sample_domain_tokens(
    name: str, calib_docs: list[list[int]], select_docs: list[list[int]], cfg: SamplerConfig, eos: int
) -> DomainSamples:
    """Deterministic calibration windows (from `calib_docs`) and selection windows (from `select_docs`,
    disjoint documents or spans) of one domain."""
    rng = np.random.default_rng([cfg.seed, _stable_hash(name)])
    n_eval_tokens = cfg.eval_windows * cfg.seq_len
    ev = spread_windows(select_docs, cfg.eval_windows, cfg.seq_len, eos)
    if ev.shape[0] < cfg.eval_windows:
        have = sum(len(d) for d in select_docs)
        raise ValueError(
            f"domain {name!r} has only {have} selection tokens ({ev.shape[0]} windows); it needs "
            f"{cfg.eval_windows} x {cfg.seq_len} = {n_eval_tokens}: lower --eval-windows/--seq-len or add text"
        )
    pool = calibration_pool(calib_docs, cfg.seq_len, eos)
    pool_tokens = sum(len(d) for d in pool)
    need = cfg.samples_per_domain * cfg.seq_len
    if pool_tokens < need:
        raise ValueError(
            f"domain {name!r} has only {pool_tokens} calibration tokens in its calibration split "
            f"({len(calib_docs)} segments); N x L = {cfg.samples_per_domain} x "
            f"{cfg.seq_len} = {need} needed: lower --samples-per-domain or --seq-len, or add text"
        )
    calib = draw_windows(pool, cfg.samples_per_domain, cfg.seq_len, rng)
    return DomainSamples(calib=calib, eval=ev, calib_pool_tokens=pool_tokens,
                         documents=len(calib_docs) + len(select_docs))  # fmt: skip


def _stable_hash(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"] if x]


def sample_domain_text(name: str, texts: list[str], tokenizer, cfg: SamplerConfig) -> DomainSamples:
    """Split the domain's documents (`cfg.split`), then draw calibration and selection windows."""
    if not texts:
        raise ValueError(f"domain {name!r} has no documents; check its source in the registry")
    parts = split_texts(texts, cfg.split)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    calib = _encode(tokenizer, [s.text for s in parts["calib"]])
    select = _encode(tokenizer, [s.text for s in parts["select"]])
    out = sample_domain_tokens(name, calib, select, cfg, eos)
    out.documents = len(texts)
    out.split = {r: record(parts[r]) for r in ("calib", "select")}
    return out


def eval_chars_budget(n: int, seq_len: int, split: SplitConfig) -> int:
    """Characters to read per domain for `n` evaluation windows: ~4 chars/token, 3x room, over the eval share."""
    return int(max(400_000, 12 * n * seq_len / split.eval))


def evaluation_windows(
    name: str, texts: list[str], tokenizer, n: int, seq_len: int, split: SplitConfig, eos: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Up to `n` windows spread over the domain's evaluation segments, and their split record.
    `tokenizer`: a Hugging Face tokenizer, or anything with `encode(text) -> ids` and `eos_id`."""
    segs = split_texts(texts, split)["eval"]
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "eos_id"):
        ids = [tokenizer.encode(s.text) for s in segs]
        eos = tokenizer.eos_id if eos is None else eos
    else:
        ids = _encode(tokenizer, [s.text for s in segs])
        eos = (tokenizer.eos_token_id or 0) if eos is None else eos
    w = spread_windows([x for x in ids if x], n, seq_len, eos)
    if w.shape[0] == 0:
        raise ValueError(
            f"domain {name!r} has no evaluation window of {seq_len} tokens in its evaluation split "
            f"({len(segs)} segments); add text or lower the window length"
        )
    return w, record(segs)
