"""Training stream: a weighted mixture of registry domains, tokenised and packed, resumable.

Every packed sequence comes from one domain: sequence n's domain is drawn with a generator
seeded by (seed, n), so the choice needs no state. Each domain is an endless token stream:
its documents (minus the held-out ones) in a seeded block-shuffled order, EOS after each,
epoch after epoch. A domain's position is (epoch, doc, offset): the next token is token
`offset` of document `doc` in that epoch's order. The whole stream's state is the number of
sequences emitted plus one position per domain: tiny, saved with every checkpoint, and
enough to restart exactly where a run stopped (documents before the position are re-read,
not re-tokenised). Memory is bounded by the shuffle buffer, never the corpus.

Held-out text: the stream reads only the `train` set of each domain's four-way split
(`dive_ds.data.split`, `data.split`); `heldout_windows` draws evaluation windows spread over the
`eval` set. Calibration, selection, training and evaluation text are disjoint by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dive_ds.data.registry import Domain, iter_documents, load_registry
from dive_ds.data.sampler import eval_chars_budget, spread_windows
from dive_ds.data.split import SplitConfig, segments
from dive_ds.train.config import DataConfig

BYTES_EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255) and EOS = 256: for tiny debug models (vocab_size >= 257)."""

    name = "bytes"
    eos_id = BYTES_EOS
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    """A Hugging Face tokenizer, no special tokens added; EOS separates documents."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.name = str(folder)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.tok.model_max_length = (
            1 << 62
        )  # documents are packed, never fed whole: silence the length warning
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(
                f"tokenizer {folder} has no EOS token; pass a tokenizer with one (data.tokenizer)"
            )
        self.eos_id = int(eos)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(spec: str | None, model_dir: str | Path, model_vocab: int):
    """`bytes`, a tokenizer folder, or (None) the model folder's own tokenizer; checked against the model vocab."""
    if spec == "bytes":
        tok = ByteTokenizer()
    else:
        folder = Path(spec) if spec else Path(model_dir)
        if not any(
            (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            raise ValueError(
                f"no tokenizer in {folder}; set data.tokenizer to a tokenizer folder (or `bytes` for "
                "a tiny debug model)"
            )
        tok = HFTokenizer(folder)
    if tok.vocab_size > model_vocab:
        raise ValueError(
            f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is {model_vocab}; "
            "use the model's own tokenizer"
        )
    return tok


def resolve_domains(cfg: DataConfig) -> tuple[list[Domain], np.ndarray]:
    """The training domains and their normalised mixture weights (validated)."""
    registry = load_registry(cfg.registry)
    domains = registry.select(list(cfg.domains) or None)
    names = [d.name for d in domains]
    unknown = sorted(set(cfg.weights) - set(names))
    if unknown:
        raise ValueError(f"data.weights names {unknown}, which are not training domains; known: {names}")
    w = np.array([cfg.weights.get(d.name, d.weight) for d in domains], dtype=np.float64)
    return domains, w / w.sum()


@dataclass
class DomainCursor:
    epoch: int = 0
    doc: int = 0
    offset: int = 0


class DomainStream:
    """Endless token stream of one domain (see the module docstring for the order)."""

    def __init__(
        self, domain: Domain, index: int, tokenizer, cfg: DataConfig, cursor: DomainCursor | None = None
    ):
        self.domain, self.index, self.tok, self.cfg = domain, index, tokenizer, cfg
        self.cursor = cursor or DomainCursor()
        self._docs: Iterator[str] | None = None
        self._tokens: list[int] | None = None

    def _epoch_docs(self, epoch: int) -> Iterator[str]:
        """This epoch's training segments: blocks of the stored order, each permuted with a seeded RNG."""
        size = self.cfg.shuffle_buffer
        block: list[str] = []
        n_block = 0

        def shuffled(block: list[str], n_block: int) -> list[str]:
            rng = np.random.default_rng([self.cfg.seed, self.index, epoch, n_block])
            return [block[i] for i in rng.permutation(len(block))]

        for seg in segments(iter_documents(self.domain), self.cfg.split, "train"):
            block.append(seg.text)
            if len(block) == size:
                yield from shuffled(block, n_block)
                block, n_block = [], n_block + 1
        if block:
            yield from shuffled(block, n_block)

    def _load(self) -> None:
        """Open the epoch at the cursor and tokenise the cursor's document."""
        c = self.cursor
        self._docs = self._epoch_docs(c.epoch)
        for _ in range(c.doc):
            if next(self._docs, None) is None:
                raise ValueError(
                    f"data state does not fit domain {self.domain.name!r}: epoch {c.epoch} has fewer "
                    f"than {c.doc} documents (did the data change since the checkpoint?)"
                )
        self._next_doc(first=True)

    def _next_doc(self, first: bool = False) -> None:
        text = next(self._docs, None)
        if text is None:
            if first and self.cursor.doc == 0:
                raise ValueError(
                    f"domain {self.domain.name!r} has no training text in its `train` split "
                    f"(data.split.train={self.cfg.split.train}); add text or raise the share"
                )
            self.cursor = DomainCursor(self.cursor.epoch + 1, 0, 0)
            self._docs = self._epoch_docs(self.cursor.epoch)
            text = next(self._docs, None)
            if text is None:
                raise ValueError(f"domain {self.domain.name!r} has no training documents")
        elif not first:
            self.cursor = DomainCursor(self.cursor.epoch, self.cursor.doc + 1, 0)
        self._tokens = self.tok.encode(text) + [self.tok.eos_id]

    def take(self, n: int) -> list[int]:
        if self._tokens is None:
            self._load()
        out: list[int] = []
        while len(out) < n:
            if self.cursor.offset >= len(self._tokens):
                self._next_doc()
            need = n - len(out)
            chunk = self._tokens[self.cursor.offset : self.cursor.offset + need]
            out.extend(chunk)
            self.cursor.offset += len(chunk)
        return out


class PackedStream:
    """Fixed-length sequences from the weighted domain mixture; `state_dict` / `load_state_dict` resume it."""

    def __init__(self, cfg: DataConfig, domains: list[Domain], probs: np.ndarray, tokenizer):
        self.cfg, self.domains, self.tok = cfg, domains, tokenizer
        self.cum = np.cumsum(probs)
        self.cum[-1] = 1.0
        self.sequences = 0
        self.streams = [DomainStream(d, i, tokenizer, cfg) for i, d in enumerate(domains)]
        self._overfit: list[tuple[int, list[int]]] | None = None

    def _choose(self, n: int) -> int:
        u = np.random.default_rng([self.cfg.seed, n]).random()
        return int(np.searchsorted(self.cum, u, side="right"))

    def _fresh(self, n: int) -> tuple[int, list[int]]:
        d = self._choose(n)
        return d, self.streams[d].take(self.cfg.seq_len)

    def next_sequence(self) -> tuple[int, list[int]]:
        """(domain index, seq_len token ids) of the next sequence."""
        k = self.cfg.overfit_sequences
        if k > 0:
            if self._overfit is None:
                self.streams = [DomainStream(d, i, self.tok, self.cfg) for i, d in enumerate(self.domains)]
                self._overfit = [self._fresh(i) for i in range(k)]
            item = self._overfit[self.sequences % k]
        else:
            item = self._fresh(self.sequences)
        self.sequences += 1
        return item

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences -> (ids [n, seq_len] int64, domain index [n])."""
        items = [self.next_sequence() for _ in range(n)]
        return (
            torch.tensor([t for _, t in items], dtype=torch.long),
            torch.tensor([d for d, _ in items], dtype=torch.long),
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch(1)[0][0]

    def state_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "domains": {s.domain.name: vars(s.cursor).copy() for s in self.streams},
        }

    def load_state_dict(self, state: dict) -> None:
        names = [d.name for d in self.domains]
        if sorted(state.get("domains", {})) != sorted(names):
            raise ValueError(
                f"data state is for domains {sorted(state.get('domains', {}))} but this run trains on "
                f"{sorted(names)}; resume with the same data config"
            )
        self.sequences = int(state["sequences"])
        self._overfit = None
        self.streams = [
            DomainStream(d, i, self.tok, self.cfg, DomainCursor(**state["domains"][d.name]))
            for i, d in enumerate(self.domains)
        ]


def build_stream(cfg: DataConfig, tokenizer) -> PackedStream:
    domains, probs = resolve_domains(cfg)
    return PackedStream(cfg, domains, probs, tokenizer)


def heldout_windows(
    domain: Domain, tokenizer, seq_len: int, n_windows: int, split: SplitConfig
) -> torch.Tensor:
    """Up to n_windows windows ([n, seq_len]) spread over the domain's evaluation set (`split`)."""
    text = iter_documents(domain, eval_chars_budget(n_windows, seq_len, split, domain.source.type))
    docs = [tokenizer.encode(s.text) for s in segments(text, split, "eval")]
    return spread_windows([d for d in docs if d], n_windows, seq_len, tokenizer.eos_id)


def data_recipe(cfg: DataConfig, domains: list[Domain], probs: np.ndarray, tokenizer) -> dict:
    """What the run folder records about the training data."""
    return {
        "registry": cfg.registry,
        "domains": {
            d.name: {"weight": round(float(p), 6), "family": d.family} for d, p in zip(domains, probs)
        },
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "tokenizer": tokenizer.name,
        "eos_id": tokenizer.eos_id,
        "shuffle_buffer": cfg.shuffle_buffer,
        "split": dataclasses.asdict(cfg.split),
        "overfit_sequences": cfg.overfit_sequences,
        "packing": "one domain per sequence; documents EOS-separated and concatenated",
    }
