"""The calibration sampler: deterministic, exact window length, spread selection windows."""

import pytest
import torch

from dive_ds.data.sampler import SamplerConfig, sample_domain_tokens, spread_windows, spread_windows_clustered

EOS = 0


def _corpus(lengths, offset=1):
    """Documents whose every token id is unique, so overlaps are detectable exactly."""
    docs, nxt = [], offset
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


SELECT = _corpus([300, 500], offset=100_000)  # selection documents, ids apart from every calibration one


def test_deterministic_and_exact_length():
    docs = _corpus([700, 40, 30, 900, 25, 300, 10, 2000])
    cfg = SamplerConfig(samples_per_domain=20, seq_len=64, eval_windows=4, seed=7)
    a = sample_domain_tokens("x", docs, SELECT, cfg, EOS)
    b = sample_domain_tokens("x", docs, SELECT, cfg, EOS)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    assert a.calib.shape == (20, 64) and a.eval.shape == (4, 64)
    c = sample_domain_tokens("x", docs, SELECT, SamplerConfig(20, 64, 4, seed=8), EOS)
    assert not torch.equal(a.calib, c.calib)


def test_windows_come_from_their_own_documents():
    docs = _corpus([700, 40, 30, 900, 25, 300, 10, 2000, 120, 64])
    for seed in range(5):
        s = sample_domain_tokens("x", docs, SELECT, SamplerConfig(50, 32, 6, seed=seed), EOS)
        ev = set(s.eval.flatten().tolist()) - {EOS}
        cal = set(s.calib.flatten().tolist()) - {EOS}
        assert ev <= {t for d in SELECT for t in d} and cal <= {t for d in docs for t in d}


def test_windows_are_contiguous_text():
    docs = _corpus([5000])
    s = sample_domain_tokens("x", docs, SELECT, SamplerConfig(10, 16, 2, seed=1), EOS)
    for w in s.calib:  # a window of one long document is a run of consecutive ids
        assert torch.equal(w[1:] - w[:-1], torch.ones(15, dtype=torch.long))


def test_short_documents_are_concatenated():
    docs = _corpus([10] * 100)
    s = sample_domain_tokens("x", docs, SELECT, SamplerConfig(5, 32, 1, seed=0), EOS)
    assert (s.calib == EOS).any()  # windows span several short documents, EOS between them


def test_too_little_text_says_how_much():
    docs = _corpus([100, 100])
    with pytest.raises(ValueError, match=r"has only \d+ calibration tokens .* 10 x 64 = 640 needed"):
        sample_domain_tokens("tiny", docs, SELECT, SamplerConfig(10, 64, 1, seed=0), EOS)
    with pytest.raises(ValueError, match=r"only 800 selection tokens \(11 windows\).* 12 x 64"):
        sample_domain_tokens("tiny", _corpus([5000]), SELECT, SamplerConfig(10, 64, 12, seed=0), EOS)


def test_spread_windows_take_every_document_first():
    docs = _corpus([100, 40, 250, 30])  # windows of 50: doc0 has 2, doc2 has 5; 40 + 30 are joined (1)
    w, clusters = spread_windows_clustered(docs, 5, 50, EOS)
    # round 1: one window of each; round 2: the two documents that have more; doc2's two are evenly spaced
    assert [int(r[0]) for r in w] == [1, 51, 141, 241, 101]
    assert clusters[:4] == [0, 0, 1, 1] and clusters[4] not in clusters[:4]
    assert spread_windows(docs, 100, 50, EOS).shape == (8, 50)  # all there are, when fewer
    # a partial round goes to evenly spaced documents, not the first ones
    many = _corpus([60] * 10)
    assert [int(r[0]) for r in spread_windows(many, 4, 50, EOS)] == [1 + 60 * i for i in (0, 2, 5, 7)]
    # one stream of short documents: its windows are spread over it, not its first ones
    short = _corpus([20] * 100)  # joined: 2100 tokens, 42 windows of 50
    starts = [int(r[0]) for r in spread_windows(short, 3, 50, EOS)]
    assert starts[0] == 1 and starts[-1] > 1000
