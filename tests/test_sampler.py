"""The calibration sampler: deterministic, exact window length, no eval/calib overlap."""

import pytest
import torch

from dive_ds.data.sampler import SamplerConfig, sample_domain_tokens

EOS = 0


def _corpus(lengths, offset=1):
    """Documents whose every token id is unique, so overlaps are detectable exactly."""
    docs, nxt = [], offset
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    return docs


def test_deterministic_and_exact_length():
    docs = _corpus([700, 40, 30, 900, 25, 300, 10, 2000])
    cfg = SamplerConfig(samples_per_domain=20, seq_len=64, eval_windows=4, seed=7)
    a = sample_domain_tokens("x", docs, cfg, EOS)
    b = sample_domain_tokens("x", docs, cfg, EOS)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    assert a.calib.shape == (20, 64) and a.eval.shape == (4, 64)
    c = sample_domain_tokens("x", docs, SamplerConfig(20, 64, 4, seed=8), EOS)
    assert not torch.equal(a.calib, c.calib)


def test_no_overlap_between_eval_and_calib():
    docs = _corpus([700, 40, 30, 900, 25, 300, 10, 2000, 120, 64])
    for seed in range(5):
        s = sample_domain_tokens("x", docs, SamplerConfig(50, 32, 6, seed=seed), EOS)
        ev = set(s.eval.flatten().tolist()) - {EOS}
        cal = set(s.calib.flatten().tolist()) - {EOS}
        assert ev and cal and not (ev & cal)


def test_windows_are_contiguous_text():
    docs = _corpus([5000])
    s = sample_domain_tokens("x", docs, SamplerConfig(10, 16, 2, seed=1), EOS)
    for w in s.calib:  # a window of one long document is a run of consecutive ids
        assert torch.equal(w[1:] - w[:-1], torch.ones(15, dtype=torch.long))


def test_short_documents_are_concatenated():
    docs = _corpus([10] * 100)
    s = sample_domain_tokens("x", docs, SamplerConfig(5, 32, 1, seed=0), EOS)
    assert (s.calib == EOS).any()  # windows span several short documents, EOS between them


def test_too_little_text_says_how_much():
    docs = _corpus([100, 100])
    with pytest.raises(ValueError, match=r"has only \d+ calibration tokens .* 10 x 64 = 640 needed"):
        sample_domain_tokens("tiny", docs, SamplerConfig(10, 64, 1, seed=0), EOS)
