"""Per-pair losses agree with open_clip; the softmax conditional agrees with brute-force recomputation."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.losses import SoftmaxScorer, pair_logits, sigmoid_pair_loss, softmax_set_loss
from composer_jest.core.selection import joint_sample


def features(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(n, d, generator=g), dim=-1)  # correlated pairs
    return x, y


def test_sigmoid_pair_loss_matches_open_clip_siglip():
    x, y = features(24)
    scale, bias = torch.tensor([7.5]), torch.tensor([-4.0])
    pair = sigmoid_pair_loss(x, y, scale, bias)
    expected = open_clip.loss.SigLipLoss()(x, y, scale, bias)
    assert torch.allclose(pair.sum(1).mean(), expected, atol=1e-5)
    # and each entry is the binary term with +1 on the diagonal only
    logits = scale * x @ y.T + bias
    assert torch.allclose(pair[2, 2], -F.logsigmoid(logits[2, 2]))
    assert torch.allclose(pair[2, 5], -F.logsigmoid(-logits[2, 5]))


def test_sigmoid_pair_loss_needs_bias():
    x, y = features(4)
    with pytest.raises(ValueError, match='logit_bias'):
        sigmoid_pair_loss(x, y, 10.0, None)


def test_softmax_set_loss_matches_open_clip_clip_loss():
    x, y = features(20, seed=1)
    logits = pair_logits(x, y, 12.0)
    idx = torch.tensor([1, 4, 5, 9, 17])
    expected = open_clip.loss.ClipLoss()(x[idx], y[idx], 12.0)
    assert torch.allclose(softmax_set_loss(logits, idx) / idx.numel(), expected, atol=1e-5)


def test_softmax_conditional_equals_brute_force_gain():
    x, y = features(16, seed=2)
    xr, yr = features(16, seed=3)
    learner, reference = pair_logits(x, y, 10.0), pair_logits(xr, yr, 10.0)
    scorer = SoftmaxScorer([(learner, 1.0), (reference, -1.0)])
    assert torch.equal(scorer.initial(), torch.zeros(16))  # a singleton's softmax loss is zero

    def learnability(indices):
        return softmax_set_loss(learner, indices) - softmax_set_loss(reference, indices)

    chosen = torch.tensor([], dtype=torch.long)
    for new in (torch.tensor([0, 5]), torch.tensor([3]), torch.tensor([11, 12, 7])):
        gain = scorer.add(new)
        chosen = torch.cat([chosen, new])
        for k in range(16):
            if k in chosen:
                continue
            brute = learnability(torch.cat([chosen, torch.tensor([k])])) - learnability(chosen)
            assert torch.allclose(gain[k], brute, atol=1e-4), (k, gain[k], brute)


@pytest.mark.parametrize('knows', ['reference', 'learner'])
def test_joint_sample_with_softmax_scorer_follows_learnability_sign(knows):
    # One model matches pairs 0..7 and nothing else; the other is uninformative (constant logits).
    # Learnability = learner loss - reference loss: pairs the reference knows are learnable (picked
    # often), pairs the learner already knows are not (picked rarely). Uniform would give 8 / 32.
    n = 32
    x = features(n, seed=4)[0]
    y = features(n, seed=5)[1]
    y[:8] = x[:8]
    informed, constant = pair_logits(x, y, 10.0), torch.zeros(n, n)
    learner, reference = (constant, informed) if knows == 'reference' else (informed, constant)
    hits = 0
    for seed in range(20):
        scorer = SoftmaxScorer([(learner, 1.0), (reference, -1.0)])
        idx = joint_sample(scorer, 8, n_chunks=4, generator=torch.Generator().manual_seed(seed))
        assert idx.unique().numel() == 8
        hits += int((idx < 8).sum())
    fraction = hits / (20 * 8)
    # softmax gains differ by at most ~log(batch) nats, so the preference is moderate (measured 0.46)
    assert fraction > 0.4 if knows == 'reference' else fraction < 0.1, fraction
