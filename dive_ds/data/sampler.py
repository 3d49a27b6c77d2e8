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
    """`spread_windows_clustered` without the cluster ids."""
    return spread_windows_clustered(docs, n, seq_len, eos)[0]


def spread_windows_clustered(
    docs: list[list[int]], n: int, seq_len: int, eos: int
) -> tuple[torch.Tensor, list[int]]:
    """Up to `n` non-overlapping windows spread over the documents, and each window's cluster (its
    document; windows of the EOS-joined stream of short documents are clusters of their own).

    Documents shorter than `seq_len` are EOS-joined into one stream treated as a document (last). Every
    document gets one window before any gets two (round by round; a round that cannot be completed goes
    to evenly spaced documents), and a document's windows are evenly spaced over it, so the windows cover
    the whole set, not its start. -> ([min(n, available), seq_len] int64, cluster id per window)."""
    pool = calibration_pool(docs, seq_len, eos)
    joined = sum(len(d) + 1 for d in docs if len(d) < seq_len)  # calibration_pool appends it when >= seq_len
    stream = len(pool) - 1 if joined >= seq_len else -1
    m = [len(d) // seq_len for d in pool]
    c = [0] * len(pool)
    left = n
    while left > 0:
        open_ = [i for i in range(len(pool)) if c[i] < m[i]]
        if not open_:
            break
        if len(open_) > left:  # the last, partial round: evenly spaced documents
            open_ = [open_[j * len(open_) // left] for j in range(left)]
        for i in open_:
            c[i] += 1
        left -= len(open_)
    out, clusters = [], []
    for i, d in enumerate(pool):
        for j in range(c[i]):
            k = j * m[i] // c[i]
            out.append(d[k * seq_len : (k + 1) * seq_len])
            clusters.append(i if i != stream else len(pool) + len(out))
    return torch.tensor(out, dtype=torch.long).view(len(out), seq_len), clusters


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


def eval_chars_budget(n: int, seq_len: int, split: SplitConfig, source_type: str = "hub") -> int | None:
    """Characters to read per domain for `n` evaluation windows. Local and demo domains are read whole
    (None), so the windows spread over the whole evaluation set; a hub stream, which may not end, is read
    for ~4 chars/token with 10x room over the eval share."""
    if source_type in ("local", "demo"):
        return None
    return int(max(4_000_000, 40 * n * seq_len / split.eval))


def evaluation_windows(
    name: str, texts: list[str], tokenizer, n: int, seq_len: int, split: SplitConfig, eos: int | None = None
) -> tuple[torch.Tensor, dict]:
    """Up to `n` windows spread over the domain's evaluation segments, and their split record (span ids,
    and `clusters`: per window, the document it came from, for a cluster bootstrap; windows of joined
    short documents are clusters of their own). `tokenizer`: a Hugging Face tokenizer, or anything with
    `encode(text) -> ids` and `eos_id`."""
    segs = split_texts(texts, split)["eval"]
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "eos_id"):
        ids = [tokenizer.encode(s.text) for s in segs]
        eos = tokenizer.eos_id if eos is None else eos
    else:
        ids = _encode(tokenizer, [s.text for s in segs])
        eos = (tokenizer.eos_token_id or 0) if eos is None else eos
    kept = [k for k, x in enumerate(ids) if x]
    w, pool_ids = spread_windows_clustered([ids[k] for k in kept], n, seq_len, eos)
    if w.shape[0] == 0:
        raise ValueError(
            f"domain {name!r} has no evaluation window of {seq_len} tokens in its evaluation split "
            f"({len(segs)} segments); add text or lower the window length"
        )
    long = [
        k for k in kept if len(ids[k]) >= seq_len
    ]  # the pool's documents, in order; the stream after them
    clusters = [segs[long[i]].doc if i < len(long) else 10**9 + i for i in pool_ids]
    return w, record(segs) | {"clusters": clusters}
