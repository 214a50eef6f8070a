"""Exact (noise-given) checks of the samplers against a plain loop of Algorithm 1: fast enough to run per mutant.

The statistical tests in test_selection.py check the draw distribution with 20 000+ draws; these take the
Gumbel noise the sampler uses (``gumbel_noise(draw_seed(g), group, ...)``) and replay the algorithm by hand:
chunk ``t`` takes the top ``size_t`` of ``c_k / T + noise[t, k]`` over unchosen ``k``, where
``c_k = s(C ∪ {k}) - s(C)`` is computed from the batch score by brute force.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.losses import SoftmaxScorer, pair_logits, sigmoid_pair_loss, softmax_set_loss
from composer_jest.core.scoring import jest_select
from composer_jest.core.selection import (
    PairScorer,
    batch_score,
    blockwise_sample,
    chunk_sizes,
    draw_seed,
    gumbel_noise,
    independent_sample,
    joint_sample,
    score_matrix,
    selection_noise,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loop_draw(gain, n: int, sizes: list[int], noise: torch.Tensor, temperature: float, joint: bool) -> list[int]:
    """Algorithm 1 by hand: ``gain(chosen, k)`` is the conditional score of ``k`` given the list ``chosen``."""
    chosen: list[int] = []
    for t, size in enumerate(sizes):
        base = chosen if joint else []
        logits = [(-math.inf if k in chosen else gain(base, k) / temperature + float(noise[t, k])) for k in range(n)]
        order = sorted(range(n), key=lambda k: -logits[k])
        chosen += order[:size]
    return chosen


def pair_gain(scores: torch.Tensor):
    def gain(chosen, k):
        with_k = torch.tensor(chosen + [k])
        return float(batch_score(scores, with_k) - (batch_score(scores, torch.tensor(chosen)) if chosen else 0.0))
    return gain


@pytest.mark.parametrize('n_select, n_chunks, temperature', [(6, 3, 1.0), (7, 3, 0.5), (5, 5, 2.0), (4, 1, 1.0)])
def test_joint_sample_is_algorithm_1_on_its_noise(n_select, n_chunks, temperature):
    scores = torch.randn(20, 20, generator=gen(1)) * 2
    g = gen(5)
    got = joint_sample(scores, n_select, n_chunks, g, temperature=temperature)
    sizes = chunk_sizes(n_select, n_chunks)
    noise = gumbel_noise(draw_seed(gen(5)), 0, (len(sizes), 20), 'cpu')
    assert got.tolist() == loop_draw(pair_gain(scores), 20, sizes, noise, temperature, joint=True)
    # one value drawn from the caller's generator per selection: the state moved exactly as draw_seed moves it
    twin = gen(5)
    draw_seed(twin)
    assert torch.equal(g.get_state(), twin.get_state())


def test_independent_sample_is_one_chunk_on_the_diagonal():
    scores = torch.randn(16, 16, generator=gen(2)) * 3
    got = independent_sample(scores, 6, gen(3), temperature=0.7)
    noise = gumbel_noise(draw_seed(gen(3)), 0, (1, 16), 'cpu')
    expected = torch.topk(torch.diagonal(scores) / 0.7 + noise[0], 6).indices
    assert got.tolist() == expected.tolist()


def test_groups_draw_their_quota_with_their_own_noise():
    n, groups, n_select, n_chunks = 24, 3, 9, 2
    scores = torch.randn(n, n, generator=gen(4))
    got = joint_sample(scores, n_select, n_chunks, gen(6), n_groups=groups)
    seed, size = draw_seed(gen(6)), n // groups
    sizes = chunk_sizes(n_select // groups, n_chunks)
    noise = torch.stack([gumbel_noise(seed, g, (len(sizes), size), 'cpu') for g in range(groups)], 1)
    gain, chosen = pair_gain(scores), []
    for t, s in enumerate(sizes):
        new = []
        for g in range(groups):
            logits = torch.tensor([-math.inf if g * size + k in chosen
                                   else gain(chosen, g * size + k) + float(noise[t, g, k]) for k in range(size)])
            new += (torch.topk(logits, s).indices + g * size).tolist()
        chosen += new
    assert got.tolist() == chosen


def test_gumbel_noise_is_standard_gumbel_and_keyed_by_seed_and_group():
    x = gumbel_noise(11, 2, (200_000,), 'cpu')
    assert x.dtype == torch.float32 and x.shape == (200_000,)
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (standard errors ~0.003 and ~0.01)
    assert abs(float(x.mean()) - 0.5772) < 0.015 and abs(float(x.var()) - math.pi ** 2 / 6) < 0.05
    assert torch.isfinite(x).all()
    assert not torch.equal(gumbel_noise(11, 1, (8,), 'cpu'), gumbel_noise(11, 2, (8,), 'cpu'))
    assert not torch.equal(gumbel_noise(11, 1, (8,), 'cpu'), gumbel_noise(12, 1, (8,), 'cpu'))
    # an underflowing uniform draw is clamped, never -log(-log 0) = -inf
    assert torch.isfinite(-torch.log(-torch.log(torch.zeros(1).clamp_(min=torch.finfo(torch.float32).tiny))))


def test_selection_noise_shape_follows_the_chunks():
    assert selection_noise(gen(0), 0, 10, 4, True, 30, 'cpu').shape == (4, 30)
    assert selection_noise(gen(0), 0, 10, 4, False, 30, 'cpu').shape == (1, 30)
    assert selection_noise(gen(0), 0, 3, 16, True, 30, 'cpu').shape == (3, 30)
    a = selection_noise(gen(0), 1, 10, 4, True, 30, 'cpu')
    assert torch.equal(a, gumbel_noise(draw_seed(gen(0)), 1, (4, 30), 'cpu'))


def test_chunk_sizes_split_evenly_larger_first():
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(8, 4) == [2, 2, 2, 2]
    assert chunk_sizes(3, 16) == [1, 1, 1]
    assert chunk_sizes(7, 1) == [7]
    assert chunk_sizes(1, 1) == [1]


def features(n: int, d: int, seed: int) -> dict:
    g = gen(seed)
    return {'image_features': F.normalize(torch.randn(n, d, generator=g), dim=-1),
            'text_features': F.normalize(torch.randn(n, d, generator=g), dim=-1),
            'logit_scale': torch.tensor(8.0), 'logit_bias': torch.tensor(-3.0)}


def sigmoid_scores(score: str, learner: dict, reference: dict) -> torch.Tensor:
    def loss(f):
        return sigmoid_pair_loss(f['image_features'], f['text_features'], f['logit_scale'], f['logit_bias'])
    return score_matrix(score, loss(learner), loss(reference))


@pytest.mark.parametrize('score', ['learnability', 'hard_learner', 'easy_reference', 'uniform'])
@pytest.mark.parametrize('selection', ['joint', 'independent'])
def test_jest_select_sigmoid_is_algorithm_1_with_exact_statistics(score, selection):
    n, b, n_chunks, temperature = 18, 6, 3, 0.8
    learner, reference = features(n, 8, 1), features(n, 8, 2)
    sel = jest_select(learner, reference, b, score=score, selection=selection, n_chunks=n_chunks,
                      temperature=temperature, generator=gen(9))
    scores = sigmoid_scores(score, learner, reference)
    joint = selection == 'joint'
    sizes = chunk_sizes(b, n_chunks if joint else 1)
    noise = gumbel_noise(draw_seed(gen(9)), 0, (len(sizes), n), 'cpu')
    assert sel.indices.tolist() == loop_draw(pair_gain(scores), n, sizes, noise, temperature, joint)
    assert torch.equal(sel.global_indices, sel.indices)
    # statistics are learnability whatever the score: s(B) / b exactly; the uniform figure diag/N + (b-1) mean off-diag
    learn = sigmoid_scores('learnability', learner, reference)
    torch.testing.assert_close(sel.stats['learnability_selected'], batch_score(learn, sel.indices) / b)
    off = (learn.sum() - learn.diagonal().sum()) / (n * (n - 1))
    torch.testing.assert_close(sel.stats['learnability_superbatch'], learn.diagonal().mean() + (b - 1) * off)


def softmax_gain(terms):
    def gain(chosen, k):
        with_k = torch.tensor(chosen + [k])
        total = 0.0
        for logits, w in terms:
            before = softmax_set_loss(logits, torch.tensor(chosen)) if chosen else 0.0
            total += w * float(softmax_set_loss(logits, with_k) - before)
        return total
    return gain


def logits_of(f: dict) -> torch.Tensor:
    return f['logit_scale'] * f['image_features'] @ f['text_features'].T


@pytest.mark.parametrize('score', ['learnability', 'hard_learner', 'easy_reference'])
def test_jest_select_softmax_joint_is_algorithm_1_with_exact_statistics(score):
    n, b, n_chunks, temperature = 16, 6, 3, 0.5
    learner, reference = features(n, 8, 3), features(n, 8, 4)
    sel = jest_select(learner, reference, b, score=score, loss='softmax', n_chunks=n_chunks,
                      temperature=temperature, generator=gen(2))
    weights = {'learnability': (1.0, -1.0), 'hard_learner': (1.0, 0.0), 'easy_reference': (0.0, -1.0)}[score]
    terms = [(logits_of(learner), weights[0]), (logits_of(reference), weights[1])]
    sizes = chunk_sizes(b, n_chunks)
    noise = gumbel_noise(draw_seed(gen(2)), 0, (len(sizes), n), 'cpu')
    assert sel.indices.tolist() == loop_draw(softmax_gain(terms), n, sizes, noise, temperature, joint=True)
    learn = [(logits_of(learner), 1.0), (logits_of(reference), -1.0)]
    selected = sum(w * softmax_set_loss(lg, sel.indices) for lg, w in learn) / b
    torch.testing.assert_close(sel.stats['learnability_selected'], selected, atol=1e-5, rtol=1e-5)
    # the uniform figure: the mean of L(block) / b over consecutive b-blocks of the super-batch
    blocks = torch.arange(n // b * b).view(-1, b)
    uniform = sum(w * softmax_set_loss(lg, blk) for lg, w in learn for blk in blocks) / (len(blocks) * b)
    torch.testing.assert_close(sel.stats['learnability_superbatch'], uniform, atol=1e-5, rtol=1e-5)


def test_jest_select_softmax_independent_is_the_per_example_loss():
    n, b = 16, 5
    learner, reference = features(n, 8, 5), features(n, 8, 6)
    sel = jest_select(learner, reference, b, loss='softmax', selection='independent', generator=gen(4))
    per = [0.5 * (lg.logsumexp(1) + lg.logsumexp(0) - 2 * lg.diagonal()) for lg in map(logits_of, (learner, reference))]
    noise = gumbel_noise(draw_seed(gen(4)), 0, (1, n), 'cpu')
    assert sel.indices.tolist() == torch.topk(per[0] - per[1] + noise[0], b).indices.tolist()


def test_softmax_scorer_first_chunk_is_uniform_and_weights_combine():
    a, b = logits_of(features(10, 8, 7)), logits_of(features(10, 8, 8))
    scorer = SoftmaxScorer([(a, 1.0), (b, -0.5)])
    assert torch.equal(scorer.initial(), torch.zeros(10))
    got = scorer.add(torch.tensor([2, 5]))
    gain = softmax_gain([(a, 1.0), (b, -0.5)])
    for k in range(10):
        if k not in (2, 5):
            assert abs(float(got[k]) - gain([2, 5], k)) < 1e-4


def test_blockwise_sample_given_noise_uses_it_and_checks_its_shape():
    scores = torch.randn(12, 12, generator=gen(3))

    class Pair:
        num_items = 12

        def __init__(self):
            self.cond = torch.diagonal(scores).clone()

        def initial(self):
            return self.cond

        def add(self, new, need_cond):
            self.cond = self.cond + scores[:, new].sum(1) + scores[new, :].sum(0)
            return self.cond if need_cond else None

    noise = gumbel_noise(123, 0, (2, 12), 'cpu')
    got = blockwise_sample(Pair(), 4, 2, None, noise=noise)
    assert got.tolist() == loop_draw(pair_gain(scores), 12, [2, 2], noise, 1.0, joint=True)
    with pytest.raises(ValueError, match=r'noise must have shape \(chunks, N\) = \(2, 12\)'):
        blockwise_sample(Pair(), 4, 2, None, noise=noise[:1])


class RecordingPairScorer:
    """A :class:`BlockScorer` over one group's rows of a global pair matrix; records every ``add``."""

    def __init__(self, scores: torch.Tensor, group: int, groups: int):
        n = scores.shape[0] // groups
        self.scores, self.rows, self.num_items = scores, slice(group * n, (group + 1) * n), n
        self.offset, self.calls = group * n, []
        self.cond = torch.diagonal(scores)[self.rows].clone()

    def initial(self):
        return self.cond

    def add(self, new, need_cond):
        self.calls.append((new.tolist(), need_cond))
        return self.cond if need_cond else None


@pytest.mark.parametrize('joint', [True, False])
def test_blockwise_sample_draws_its_groups_share_of_the_dense_draw(joint):
    """Independent draws (and the first chunk of joint ones) depend only on the diagonal: each group's
    ``blockwise_sample`` with the shared generator gives exactly its part of the dense draw over all groups."""
    groups, n_local, quota = 3, 7, 2
    scores = torch.diag(torch.randn(groups * n_local, generator=gen(8)) * 2)  # no pair terms: chunks independent
    dense = (joint_sample(scores, quota * groups, 2, gen(4), n_groups=groups) if joint
             else independent_sample(scores, quota * groups, gen(4), n_groups=groups))
    for g in range(groups):
        scorer = RecordingPairScorer(scores, g, groups)
        got = blockwise_sample(scorer, quota, 2, gen(4), group=g, joint=joint)
        mine = [int(i) - g * n_local for i in dense if g * n_local <= int(i) < (g + 1) * n_local]
        assert got.tolist() == mine
        # joint: the chunk before the last is added with its conditional; the last is not (add_all=False)
        assert [c[1] for c in scorer.calls] == ([True] if joint else [])
    # add_all: the scorer sees the last chunk (joint) or the whole draw (independent), statistics only
    scorer = RecordingPairScorer(scores, 0, groups)
    got = blockwise_sample(scorer, quota, 2, gen(4), joint=joint, add_all=True)  # group 0 by default
    assert got.tolist() == [int(i) for i in dense if int(i) < n_local]
    assert [c[1] for c in scorer.calls] == ([True, False] if joint else [False])
    assert sum((c[0] for c in scorer.calls), []) == got.tolist()
    with pytest.raises(ValueError, match='n_select must be an int'):
        blockwise_sample(RecordingPairScorer(scores, 0, groups), n_local + 1, 2, gen(4))
    with pytest.raises(ValueError, match='temperature'):
        blockwise_sample(RecordingPairScorer(scores, 0, groups), quota, 2, gen(4), temperature=0.0)


def test_pair_logits_is_scale_times_dot_plus_bias():
    x, y = features(5, 4, 1)['image_features'], features(5, 4, 2)['text_features']
    torch.testing.assert_close(pair_logits(x, y, 7.0), 7.0 * x @ y.T)
    torch.testing.assert_close(pair_logits(x, y, torch.tensor(7.0), torch.tensor(-2.5)), 7.0 * x @ y.T - 2.5)


def test_uniform_takes_its_size_from_either_loss():
    loss = torch.rand(4, 4)
    assert torch.equal(score_matrix('uniform', loss, None), torch.zeros(4, 4))
    assert torch.equal(score_matrix('uniform', None, loss), torch.zeros(4, 4))
    with pytest.raises(ValueError, match='at least one loss matrix'):
        score_matrix('uniform')


def test_independent_sample_checks_its_sizes():
    scores = torch.zeros(6, 6)
    with pytest.raises(ValueError, match=r'n_select must be an int in \[1, N=6\]'):
        independent_sample(scores, 7, gen(0))
    with pytest.raises(ValueError, match='n_groups must be an int >= 1 dividing both N=6 and n_select=2'):
        independent_sample(scores, 2, gen(0), n_groups=4)
    assert independent_sample(scores, 4, gen(0), n_groups=2).numel() == 4


def test_softmax_scorer_with_one_term():
    a = logits_of(features(9, 8, 3))
    scorer = SoftmaxScorer([(a, 1.0)])
    assert scorer.num_items == 9 and torch.equal(scorer.initial(), torch.zeros(9))
    got = scorer.add(torch.tensor([4]))
    assert abs(float(got[0]) - softmax_gain([(a, 1.0)])([4], 0)) < 1e-4


def test_independent_sample_takes_a_conditional_scorer():
    scores = torch.randn(12, 12, generator=gen(6))
    want = independent_sample(scores, 4, gen(2), n_groups=2)
    assert torch.equal(independent_sample(PairScorer(scores), 4, gen(2), n_groups=2), want)
    with pytest.raises(ValueError, match=r'n_select must be an int in \[1, N=12\]'):
        independent_sample(PairScorer(scores), 13, gen(2))


def test_finite_scores_whose_sum_overflows_are_accepted():
    """Only NaN/inf entries are refused: finite float32 scores may overflow in their sum (the fast check)."""
    scores = torch.zeros(6, 6)
    scores[0, 0] = scores[1, 1] = 3e38  # finite; their sum is inf in float32
    assert not torch.isfinite(scores.sum())
    assert sorted(independent_sample(scores, 2, gen(0)).tolist()) == [0, 1]


def test_the_seed_and_the_noise_are_pinned():
    """Replay across versions: a checkpointed generator state must give the same seed and the same noise (a change
    here changes every resumed run's selections)."""
    assert draw_seed(gen(0)) == 900450186894289455
    assert gumbel_noise(7, 1, (3,), 'cpu').tolist() == pytest.approx([0.480752, 0.716538, 1.878239], abs=1e-6)


def test_group_and_size_checks():
    scores = torch.randn(8, 8, generator=gen(1))
    assert sorted(joint_sample(scores, 8, 2, gen(0)).tolist()) == list(range(8))  # n_select = N is allowed
    with pytest.raises(ValueError, match='n_groups must be an int >= 1 dividing both N=8 and n_select=2'):
        joint_sample(scores, 2, 1, gen(0), n_groups=4)  # divides N, not n_select
    with pytest.raises(ValueError, match='n_groups must be an int >= 1'):
        joint_sample(scores, 2, 1, gen(0), n_groups=0)
