"""The pure selection math: exact distributions, conditionals, and joint vs independent batches."""

from __future__ import annotations

import math

import pytest
import torch

from composer_jest.core.selection import (
    PairScorer,
    batch_score,
    chunk_sizes,
    independent_sample,
    joint_sample,
    score_matrix,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_first_chunk_is_softmax_of_diagonal():
    # One item per chunk: the first draw must be exactly ∝ exp(S_kk).
    diag = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    scores = torch.diag(diag) + 0.3 * torch.randn(5, 5, generator=gen(1))
    g, draws = gen(0), 20000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[joint_sample(scores, 2, n_chunks=2, generator=g)[0]] += 1
    expected = torch.softmax(torch.diagonal(scores), 0)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() < 4 * sigma + 1e-3).all(), (counts / draws, expected)


def test_second_chunk_follows_conditional_learnability():
    # Given the first pick i, the second is drawn ∝ exp(S_kk + S_ik + S_ki) over k != i.
    scores = torch.randn(4, 4, generator=gen(2))
    g, draws = gen(3), 30000
    counts = torch.zeros(4, 4)
    for _ in range(draws):
        i, k = joint_sample(scores, 2, n_chunks=2, generator=g).tolist()
        counts[i, k] += 1
    for i in range(4):
        cond = torch.diagonal(scores) + scores[i, :] + scores[:, i]
        cond[i] = -math.inf
        expected = torch.softmax(cond, 0)
        n_i = counts[i].sum()
        sigma = (expected * (1 - expected) / n_i).sqrt()
        assert ((counts[i] / n_i - expected).abs() < 4 * sigma + 2e-3).all(), (i, counts[i] / n_i, expected)


def test_pair_scorer_conditional_equals_brute_force():
    scores = torch.randn(12, 12, generator=gen(4))
    scorer = PairScorer(scores)
    chosen = torch.tensor([], dtype=torch.long)
    assert torch.allclose(scorer.initial(), torch.diagonal(scores))
    for new in (torch.tensor([3, 7]), torch.tensor([0]), torch.tensor([10, 2, 5])):
        cond = scorer.add(new).clone()
        chosen = torch.cat([chosen, new])
        for k in range(12):
            if k in chosen:
                continue
            brute = batch_score(scores, torch.cat([chosen, torch.tensor([k])])) - batch_score(scores, chosen)
            assert torch.allclose(cond[k], brute, atol=1e-5)


def block_scores(n_blocks: int = 4, block: int = 16, strength: float = 0.4) -> torch.Tensor:
    """Examples only score well together with their own block (hard negatives share a block)."""
    labels = torch.arange(n_blocks * block) // block
    same = (labels[:, None] == labels[None, :]).float()
    scores = strength * same
    scores.fill_diagonal_(0.0)
    return scores + 0.05 * torch.randn(scores.shape, generator=gen(5))


def mcmc_mean_score(scores: torch.Tensor, b: int, steps: int, g: torch.Generator) -> float:
    """Metropolis swap chain targeting p(B) ∝ exp(s(B)) over b-subsets; mean s(B) after burn-in."""
    n = scores.shape[0]
    perm = torch.randperm(n, generator=g)
    inside, outside = perm[:b].clone(), perm[b:].clone()
    current = float(batch_score(scores, inside))
    total, kept = 0.0, 0
    for step in range(steps):
        i = int(torch.randint(b, (1,), generator=g))
        j = int(torch.randint(n - b, (1,), generator=g))
        proposal = inside.clone()
        proposal[i] = outside[j]
        new = float(batch_score(scores, proposal))
        if math.log(float(torch.rand(1, generator=g)) + 1e-300) < new - current:
            outside[j] = inside[i]
            inside, current = proposal, new
        if step >= steps // 4:
            total, kept = total + current, kept + 1
    return total / kept


def test_joint_beats_independent_and_approaches_mcmc_on_block_scores():
    scores = block_scores()
    b, g, draws = 16, gen(6), 300

    def mean_score(sampler):
        values = torch.tensor([float(batch_score(scores, sampler())) for _ in range(draws)])
        return values.mean(), values.std() / math.sqrt(draws)

    indep, indep_se = mean_score(lambda: independent_sample(scores, b, g))
    joint = {c: mean_score(lambda c=c: joint_sample(scores, b, c, g)) for c in (1, 4, 16)}
    mcmc = mcmc_mean_score(scores, b, 20000, gen(7))  # long exact-target chain (measured ~96.9 of max 96.0+)
    # One chunk is independent sampling; more chunks condition on more of the batch and score higher.
    assert abs(joint[1][0] - indep) < 4 * (joint[1][1] + indep_se)
    assert joint[4][0] > joint[1][0] + 4 * (joint[4][1] + joint[1][1])
    assert joint[16][0] > joint[4][0] + 4 * (joint[16][1] + joint[4][1])
    # The chunked sampler approximates exp(s(B)) sampling: with one item per chunk it closes most of the
    # gap from independent sampling to the MCMC target (measured: 69 of 23 -> 97, i.e. ~0.63).
    assert (joint[16][0] - indep) / (mcmc - indep) > 0.5, (joint, indep, mcmc)


def test_same_seed_same_indices_and_different_seed_differs():
    scores = torch.randn(64, 64, generator=gen(8))
    a = joint_sample(scores, 16, 4, gen(1))
    assert torch.equal(a, joint_sample(scores, 16, 4, gen(1)))
    assert not torch.equal(a, joint_sample(scores, 16, 4, gen(2)))


def test_uneven_chunks_distinct_indices_and_group_quotas():
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(3, 16) == [1, 1, 1]
    scores = torch.randn(40, 40, generator=gen(9))
    idx = joint_sample(scores, 10, 4, gen(0))
    assert idx.numel() == 10 and idx.unique().numel() == 10
    idx = joint_sample(scores, 10, 3, gen(0), n_groups=2)  # 20 items per group, 5 drawn from each
    assert ((idx < 20).sum(), (idx >= 20).sum()) == (5, 5)
    assert idx.unique().numel() == 10


def test_high_scores_dominate_and_temperature_flattens():
    diag = torch.zeros(100)
    diag[:10] = 20.0
    scores = torch.diag(diag)
    assert set(joint_sample(scores, 10, 2, gen(0)).tolist()) == set(range(10))
    hot = joint_sample(scores, 10, 2, gen(0), temperature=1e4)
    assert len(set(hot.tolist()) - set(range(10))) >= 5


def test_score_matrix_methods():
    learner, reference = torch.rand(3, 3), torch.rand(3, 3)
    assert torch.equal(score_matrix('learnability', learner, reference), learner - reference)
    assert torch.equal(score_matrix('hard_learner', learner), learner)
    assert torch.equal(score_matrix('easy_reference', None, reference), -reference)
    assert torch.equal(score_matrix('uniform', learner, reference), torch.zeros(3, 3))
    with pytest.raises(ValueError, match='learnability'):
        score_matrix('learnabilty', learner, reference)
    with pytest.raises(ValueError, match='reference_loss'):
        score_matrix('learnability', learner, None)


@pytest.mark.parametrize(
    'scores, n_select, n_chunks, match',
    [
        (torch.zeros(3, 4), 2, 2, 'square'),
        (torch.zeros(4, 4), 5, 2, r'n_select must be an int in \[1, N=4\]'),
        (torch.zeros(4, 4), 0, 2, 'n_select'),
        (torch.zeros(4, 4), 2, 0, 'n_chunks must be an int >= 1'),
        (torch.tensor([[0.0, float('nan')], [0.0, 0.0]]), 1, 1, 'finite'),
        (torch.tensor([[0.0, float('inf')], [0.0, 0.0]]), 1, 1, 'finite'),
        (torch.zeros(4, 4), 2, 2, 'generator must be a seeded torch.Generator, got None'),
    ],
)
def test_validation(scores, n_select, n_chunks, match):
    with pytest.raises(ValueError, match=match):
        joint_sample(scores, n_select, n_chunks)


def test_extreme_scores_do_not_overflow():
    scores = torch.randn(32, 32, generator=gen(3)) * 1e4  # exp would overflow without the max shift
    idx = joint_sample(scores, 8, 4, gen(0))
    assert idx.unique().numel() == 8
    # at this scale every conditional is one-hot: the draw is the same for any seed (no NaN, no uniform fallback)
    for seed in (1, 2, 3):
        assert torch.equal(joint_sample(scores, 8, 4, gen(seed)), idx)
