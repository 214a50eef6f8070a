"""Offline reference filtering's pure core against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from composer_jest.core.filtering import SCORES, keep_count, keep_indices, reference_scores

torch.set_num_threads(1)


def _features(n=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)


def _brute_scores(x, y, score, t=None, b=None):
    out = []
    for xi, yi in zip(x.double().tolist(), y.double().tolist()):
        cos = sum(a * c for a, c in zip(xi, yi)) / math.sqrt(sum(a * a for a in xi) * sum(c * c for c in yi))
        out.append(cos if score == 'clip' else -math.log1p(math.exp(-(t * cos + b))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize('score', SCORES)
def test_scores_match_a_loop(score):
    x, y = _features()
    got = reference_scores(x, y, score=score, logit_scale=torch.tensor(7.5), logit_bias=-4.0)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got.double(), _brute_scores(x, y, score, 7.5, -4.0), atol=1e-5, rtol=1e-5)


def test_scores_are_per_row_and_chunkable():
    x, y = _features()
    whole = reference_scores(x, y)
    parts = torch.cat([reference_scores(x[i:i + 5], y[i:i + 5]) for i in range(0, 37, 5)])
    torch.testing.assert_close(whole, parts)
    # not a row-mixing score: the diagonal of x @ y.T, not any other entry
    assert not torch.allclose(whole, reference_scores(x, y.roll(1, 0)))


def test_sigmoid_ranks_like_clip():
    x, y = _features(n=200)
    a = reference_scores(x, y)
    b = reference_scores(x, y, score='sigmoid', logit_scale=10.0, logit_bias=-10.0)
    assert torch.equal(keep_indices(a, keep=0.3), keep_indices(b, keep=0.3))


def _brute_keep(scores, keep=None, threshold=None):
    s = scores.tolist()
    if threshold is not None:
        return [i for i, v in enumerate(s) if v >= threshold]
    k = max(1, int(math.floor(keep * len(s) + 0.5)))
    kept = []
    for _ in range(k):  # repeatedly take the best remaining, lowest index on ties
        best = None
        for i, v in enumerate(s):
            if i not in kept and (best is None or v > s[best]):
                best = i
        kept.append(best)
    return sorted(kept)


@pytest.mark.parametrize('keep', [0.01, 0.2, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize('seed', [0, 1])
def test_keep_matches_a_loop_with_ties(keep, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (41,), generator=g).float() / 5  # many ties
    got = keep_indices(scores, keep=keep)
    assert got.dtype == torch.long and got.tolist() == _brute_keep(scores, keep=keep)
    assert got.numel() == keep_count(41, keep)


@pytest.mark.parametrize('threshold', [-1.0, 0.2, 0.4, 0.41, 5.0])
def test_threshold_matches_a_loop(threshold):
    scores = torch.randint(0, 6, (41,), generator=torch.Generator().manual_seed(3)).float() / 5
    assert keep_indices(scores, threshold=threshold).tolist() == _brute_keep(scores, threshold=threshold)


def test_keep_counts_round_half_up_and_keep_at_least_one():
    assert [keep_count(10, f) for f in (0.3, 0.25, 0.05, 0.04, 1.0)] == [3, 3, 1, 1, 10]
    assert keep_count(0, 0.5) == 0 and keep_indices(torch.zeros(0), keep=0.5).numel() == 0


@pytest.mark.parametrize('kwargs, match', [
    ({}, 'exactly one of keep'),
    ({'keep': 0.3, 'threshold': 0.1}, 'exactly one of keep'),
    ({'keep': 0.0}, r'keep must be a fraction in \(0, 1\]'),
    ({'keep': 1.5}, r'keep must be a fraction in \(0, 1\]'),
    ({'keep': True}, r'keep must be a fraction in \(0, 1\]'),
    ({'threshold': float('nan')}, 'threshold must be a finite number'),
])
def test_keep_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_indices(torch.rand(5), **kwargs)


def test_non_finite_scores_are_refused_with_the_index():
    with pytest.raises(ValueError, match=r'pool index \[2\]'):
        keep_indices(torch.tensor([0.1, 0.2, float('nan')]), keep=0.5)


def test_score_errors_name_the_argument():
    x, y = _features(n=4)
    with pytest.raises(ValueError, match="score must be one of \\('clip', 'sigmoid'\\)"):
        reference_scores(x, y, score='softmax')
    with pytest.raises(ValueError, match='needs logit_scale'):
        reference_scores(x, y, score='sigmoid', logit_bias=0.0)
    with pytest.raises(ValueError, match='needs logit_bias'):
        reference_scores(x, y, score='sigmoid', logit_scale=1.0)
    with pytest.raises(ValueError, match='positive scale'):
        reference_scores(x, y, score='sigmoid', logit_scale=-1.0, logit_bias=0.0)
    with pytest.raises(ValueError, match='same shape'):
        reference_scores(x, y[:3])
