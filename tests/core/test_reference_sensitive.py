"""Selection that needs the reference: learnability, hard_learner and easy_reference must pick different pairs.

The super-batch (N = 64, d = 256, t = 10, b = -5; b = 8 drawn, 4 chunks, temperature 0.25) has four groups:

    A (8)   the reference matches the pair, the learner does not   -> learnable: only learnability prefers it
    B (24)  neither model matches                                 -> hard for the learner, useless: hard_learner
    C (24)  both match                                            -> easy for the reference: easy_reference
    D (8)   the learner matches, the reference does not           -> nobody should want it

``hard_learner`` (no reference term) cannot tell A from B, so it puts about |A| / (|A| + |B|) = 1/4 of its picks
on A; ``easy_reference`` cannot tell A from C, also about 1/4. A learnability that drops its reference term *is*
hard_learner, and one whose reference loss is the learner's is uniform (|A| / N = 1/8 on A).

Measured share of the picks, pooled over the 10 seeds below (torch 2.7 CPU, both paths draw the same indices):

    loss     selection     score           on A    on B    on C
    sigmoid  joint         learnability    1.00    0.00    0.00
                           hard_learner    0.31    0.69    0.00
                           easy_reference  0.32    0.00    0.68
    sigmoid  independent   learnability    1.00    0.00    0.00
                           hard_learner    0.29    0.71    0.00
                           easy_reference  0.16    0.00    0.84
    softmax  joint         learnability    0.66    0.25    0.06   (first chunk uniform: a singleton has no loss)
                           hard_learner    0.26    0.65    0.06
                           easy_reference  0.29    0.11    0.57
    softmax  independent   learnability    1.00    0.00    0.00
                           hard_learner    0.30    0.70    0.00
                           easy_reference  0.16    0.00    0.84

Thresholds sit between the groups: learnability > 0.5 on A (others <= 0.32), hard_learner > 0.5 on B (others
<= 0.25), easy_reference > 0.45 on C (others <= 0.06). Per seed the share on A varies by about ±0.15, so a
10-seed mean moves by about ±0.05: every threshold is at least 3 of those from the measured values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer_jest.core import selection as selection_module
from composer_jest.core.scoring import jest_select

N, D, B_SELECT, N_CHUNKS, TEMPERATURE, SEEDS = 64, 256, 8, 4, 0.25, range(10)
GROUP = torch.tensor([0] * 8 + [1] * 24 + [2] * 24 + [3] * 8)  # A, B, C, D as in the module docstring
REF_KNOWS = (GROUP == 0) | (GROUP == 2)
LEARNER_KNOWS = (GROUP == 2) | (GROUP == 3)
A, B, C = 0, 1, 2


def features(knows: torch.Tensor, seed: int) -> dict:
    """Unit features whose caption i matches image i iff ``knows[i]`` (others: an unrelated random caption)."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    text[knows] = image[knows]
    return {'image_features': image, 'text_features': text,
            'logit_scale': torch.tensor(10.0), 'logit_bias': torch.tensor(-5.0)}


def shares(score: str, loss: str, selection: str, path: str, same_model: bool = False) -> torch.Tensor:
    """Share of the picks in groups A, B, C, D, pooled over ``SEEDS``.

    ``path='dense'`` passes an all-False false-negative mask, which routes the draw through the ``N x N``
    objective scorers (``_DenseBlocks``) instead of the matrix-free ones.
    """
    counts = torch.zeros(4)
    for seed in SEEDS:
        learner = features(LEARNER_KNOWS, 100 + seed)
        reference = learner if same_model else features(REF_KNOWS, 200 + seed)
        mask = torch.zeros(N, N, dtype=torch.bool) if path == 'dense' else None
        idx = jest_select(learner, reference, B_SELECT, score=score, selection=selection, loss=loss,
                          n_chunks=N_CHUNKS, temperature=TEMPERATURE, mask=mask,
                          generator=torch.Generator().manual_seed(seed)).indices
        assert idx.unique().numel() == B_SELECT
        counts += torch.bincount(GROUP[idx], minlength=4).float()
    return counts / counts.sum()


CASES = [(loss, selection, path) for loss in ('sigmoid', 'softmax') for selection in ('joint', 'independent')
         for path in ('blockwise', 'dense')]


@pytest.mark.parametrize('loss, selection, path', CASES)
def test_the_three_scores_pick_different_groups(loss, selection, path):
    learn = shares('learnability', loss, selection, path)
    hard = shares('hard_learner', loss, selection, path)
    easy = shares('easy_reference', loss, selection, path)
    # learnability: what the reference knows and the learner does not
    assert learn[A] > 0.5 and hard[A] < 0.5 and easy[A] < 0.5, (learn, hard, easy)
    # hard_learner: whatever the learner does not know, reference or not
    assert hard[B] > 0.5 and learn[B] < 0.5 and easy[B] < 0.5, (learn, hard, easy)
    # easy_reference: whatever the reference knows, learner or not
    assert easy[C] > 0.45 and learn[C] < 0.45 and hard[C] < 0.45, (learn, hard, easy)


@pytest.mark.parametrize('loss, selection', [('sigmoid', 'joint'), ('softmax', 'joint'), ('softmax', 'independent')])
def test_learnability_without_its_reference_term_fails_the_check(monkeypatch, loss, selection):
    """The check above is not passed by a learnability that ignores the reference (the bug it guards against)."""
    assert shares('learnability', loss, selection, 'blockwise')[A] > 0.5
    # S = L_learner (reference term dropped): learnability becomes hard_learner
    monkeypatch.setitem(selection_module.SCORE_TERMS, 'learnability', (('learner', 1.0),))
    assert shares('learnability', loss, selection, 'blockwise')[A] < 0.5
    monkeypatch.undo()
    # the reference loss silently replaced by the learner's: S = 0, a uniform draw (1/8 of the picks on A)
    assert shares('learnability', loss, selection, 'blockwise', same_model=True)[A] < 0.5
