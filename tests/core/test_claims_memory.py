"""README: "no rank builds an N x N matrix"; the sigmoid draw needs "O(N·chunk) memory" (S is never built).

Checked by counting, not timing: a ``TorchDispatchMode`` sees every tensor any torch op creates during
``jest_select`` and records the largest. Sizes are chosen so the bounds separate: ``N = 1024`` local candidates,
``d = 16``, ``b = 32`` per rank, 8 chunks, 2 ranks (the all-gather is simulated in-process), so a chunk gathers
``chunk_g = 8`` items and the whole selection ``b_g = 64``:

* ``N x N`` = 1 048 576 elements (what a dense score matrix, or the logits of the super-batch, would hold);
* sigmoid: the largest temporaries are the ``N x chunk_g`` pair terms of a chunk (8 192), the features
  ``N x d`` (16 384) and the uniform-batch statistic's ``STAT_BLOCK x STAT_BLOCK`` block (65 536);
* softmax / anchor objectives: ``N x |C|`` against the chosen set, at most ``N x b_g`` = 65 536.

So every joint selection stays at or below ``max(N x b_g, STAT_BLOCK²)`` = 65 536 = N² / 16 (measured: sigmoid
65 536, the 256 x 256 statistic block; softmax, dcl, triplet 57 344, N x 56 chosen), and the sigmoid draw alone
(learner only, no statistics) at or below ``2 N max(d, chunk_g)`` (measured 16 384, the features). The dense
path (``mask``, the N x N logits scored at one rank) is the positive control: the same hook sees its ``N x N``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from composer_jest.core.scoring import STAT_BLOCK, jest_select

N, D, B, CHUNKS, WORLD = 1024, 16, 32, 8, 2
CHUNK_G = B * WORLD // CHUNKS  # items every rank gathers per chunk


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) that any torch op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), str(func)
        return out


def features(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {'image_features': F.normalize(torch.randn(N, D, generator=g), dim=-1),
            'text_features': F.normalize(torch.randn(N, D, generator=g), dim=-1),
            'logit_scale': torch.tensor(10.0), 'logit_bias': torch.tensor(-5.0)}


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """The other rank (simulated): the same shapes, other values."""
    return [t, t.flip(0)]


def largest(loss: str, score: str = 'learnability', world: int = WORLD, mask=None) -> LargestTensor:
    learner, reference = features(1), features(2)
    if score == 'hard_learner':
        reference = None
    with LargestTensor() as hook:
        sel = jest_select(learner, reference, B, score=score, loss=loss, n_chunks=CHUNKS, rank=0, world_size=world,
                          all_gather=gather if world > 1 else None, mask=mask,
                          generator=torch.Generator().manual_seed(0))
    assert sel.indices.numel() == B
    return hook


@pytest.mark.parametrize('loss', ['sigmoid', 'softmax', 'dcl', 'triplet'])
def test_no_rank_builds_an_n_by_n_matrix(loss):
    hook = largest(loss)
    assert hook.numel <= max(N * B * WORLD, STAT_BLOCK ** 2), (hook.numel, hook.shape, hook.op)


def test_the_sigmoid_draw_holds_n_by_chunk_not_n_by_n():
    # learner only (hard_learner, no statistics): the draw itself, whose temporaries are N x chunk_g pair terms
    hook = largest('sigmoid', score='hard_learner')
    assert hook.numel <= 2 * N * max(D, CHUNK_G), (hook.numel, hook.shape, hook.op)
    assert hook.numel < N * N // 32


def test_the_hook_sees_a_dense_scorer():
    """Positive control: the N x N logits of the dense path (false-negative mask, one rank) are caught."""
    hook = largest('sigmoid', world=1, mask=torch.zeros(N, N, dtype=torch.bool))
    assert hook.numel >= N * N, (hook.numel, hook.shape)
