"""Calibration / evaluation windows per domain (the reference recipe, made deterministic).

Pure functions over token-id lists; `sample_domain_text` adds tokenisation. Per domain:
1. documents are shuffled with the seed; the first ones (in that order) form the held-out
   evaluation stream until it holds `n_eval * seq_len` tokens (the last document taken is
   split at a token boundary, its rest staying in the calibration pool): no token of the
   evaluation windows is ever in the calibration pool;
2. calibration: documents of at least `seq_len` tokens give random windows; shorter ones
   are concatenated (separated by EOS) into one stream that is treated as a document;
   `n_samples` windows are drawn, each from a document chosen with probability
   proportional to its number of window positions, at a random start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    """Seed for the document shuffle and the window positions."""

    def __post_init__(self):
        if self.samples_per_domain < 1:
            raise ValueError(f"samples_per_domain must be >= 1 (got {self.samples_per_domain})")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (got {self.seq_len})")
        if self.eval_windows < 1:
            raise ValueError(f"eval_windows must be >= 1 (got {self.eval_windows})")

    def chars_budget(self) -> int:
        """Characters to read per domain: generous for ~4 chars/token with room for a random pick."""
        return max(400_000, 12 * (self.samples_per_domain + self.eval_windows) * self.seq_len)


@dataclass
class DomainSamples:
    calib: torch.Tensor
    """[N, L] int64 calibration windows."""
    eval: torch.Tensor
    """[n_eval, L] int64 held-out windows."""
    calib_pool_tokens: int
    """Tokens available to calibration after the held-out split."""
    documents: int


def split_eval(
    docs: list[list[int]], n_eval_tokens: int, eos: int, rng: np.random.Generator
) -> tuple[list[int], list[list[int]]]:
    """Shuffle documents; take an EOS-joined evaluation stream of `n_eval_tokens` from the front."""
    order = rng.permutation(len(docs))
    stream: list[int] = []
    rest: list[list[int]] = []
    for i in order:
        doc = docs[i]
        need = n_eval_tokens - len(stream)
        if need <= 0:
            rest.append(doc)
        elif len(doc) + 1 <= need:
            stream.extend(doc)
            stream.append(eos)
        else:
            stream.extend(doc[:need])
            if len(doc) - need > 0:
                rest.append(doc[need:])
    return stream, rest


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


def sample_domain_tokens(name: str, docs: list[list[int]], cfg: SamplerConfig, eos: int) -> DomainSamples:
    """Deterministic calibration + held-out windows from tokenised documents of one domain."""
    rng = np.random.default_rng([cfg.seed, _stable_hash(name)])
    n_eval_tokens = cfg.eval_windows * cfg.seq_len
    total = sum(len(d) for d in docs)
    stream, rest = split_eval(docs, n_eval_tokens, eos, rng)
    if len(stream) < n_eval_tokens:
        raise ValueError(
            f"domain {name!r} has only {total} tokens in {len(docs)} documents; "
            f"it needs {n_eval_tokens} held-out + {cfg.samples_per_domain} x {cfg.seq_len} calibration "
            "tokens: lower --samples-per-domain/--seq-len/--eval-windows or add text"
        )
    pool = calibration_pool(rest, cfg.seq_len, eos)
    pool_tokens = sum(len(d) for d in pool)
    need = cfg.samples_per_domain * cfg.seq_len
    if pool_tokens < need:
        raise ValueError(
            f"domain {name!r} has only {pool_tokens} calibration tokens after the {n_eval_tokens}-token "
            f"held-out split ({total} in {len(docs)} documents); N x L = {cfg.samples_per_domain} x "
            f"{cfg.seq_len} = {need} needed: lower --samples-per-domain or --seq-len, or add text"
        )
    calib = draw_windows(pool, cfg.samples_per_domain, cfg.seq_len, rng)
    ev = torch.tensor(stream[:n_eval_tokens], dtype=torch.long).view(cfg.eval_windows, cfg.seq_len)
    return DomainSamples(calib=calib, eval=ev, calib_pool_tokens=pool_tokens, documents=len(docs))


def _stable_hash(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def sample_domain_text(name: str, texts: list[str], tokenizer, cfg: SamplerConfig) -> DomainSamples:
    if not texts:
        raise ValueError(f"domain {name!r} has no documents; check its source in the registry")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return sample_domain_tokens(name, [list(x) for x in ids if x], cfg, eos)
