"""Per-pair loss matrices and the softmax conditional scorer used for selection.

Training losses are open_clip's (``SigLipLoss`` / ``ClipLoss``); this module only exposes what
selection needs and open_clip does not: the loss *per pair* (sigmoid) and the exact change of the
softmax loss when one example joins a set. These build ``N x N`` matrices: they are the dense
references (and small-N tools); training selects with the blockwise :mod:`composer_jest.core.scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    'LOSSES',
    'sigmoid_pair_loss',
    'pair_logits',
    'softmax_set_loss',
    'SoftmaxScorer',
]

LOSSES = ('sigmoid', 'softmax')


def pair_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: Optional[torch.Tensor | float] = None,
) -> torch.Tensor:
    """``l_ij = t * <x_i, y_j> (+ b)`` in float32; ``logit_scale`` is the scale ``t`` itself (not its log)."""
    logits = torch.as_tensor(logit_scale).float() * (image_features.float() @ text_features.float().T)
    if logit_bias is not None:
        logits = logits + torch.as_tensor(logit_bias).float()
    return logits


def sigmoid_pair_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Per-pair SigLIP loss ``ℓ_ij = -log σ(z_ij (t x_i·y_j + b))`` with ``z_ii = 1``, ``z_ij = -1``.

    The sigmoid loss is a plain sum of these pair terms, so ``loss.sum(1).mean()`` equals
    open_clip's ``SigLipLoss`` on the same inputs and the batch score is additive over pairs.

    Returns:
        ``N x N`` float32 matrix.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = F.normalize(torch.randn(4, 8), dim=-1)
        >>> sigmoid_pair_loss(x, x, 10.0, -10.0).shape
        torch.Size([4, 4])
    """
    if logit_bias is None:
        raise ValueError('sigmoid_pair_loss needs logit_bias: create the model with init_logit_bias (SigLIP)')
    scale = torch.as_tensor(logit_scale, device=image_features.device).float()
    bias = torch.as_tensor(logit_bias, device=image_features.device).float().reshape(1, 1)
    logits = torch.addmm(bias, image_features.float() * scale, text_features.float().T)  # t x.y + b, one GEMM
    loss = F.softplus(logits)  # z_ij = -1: -log σ(-l) = softplus(l)
    loss.diagonal().copy_(F.softplus(-torch.diagonal(logits)))  # z_ii = +1: -log σ(l) = softplus(-l)
    return loss


def softmax_set_loss(logits: torch.Tensor, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total (summed, not averaged) CLIP softmax loss of the set ``B`` on a logit matrix.

    ``L(B) = sum_{i in B} ½ [LSE_{j in B} l_ij + LSE_{j in B} l_ji - 2 l_ii]`` — the mean of
    image→text and text→image cross-entropy, summed over the set. ``L(B) / |B|`` equals open_clip's
    ``ClipLoss`` on the features of ``B``.
    """
    if indices is not None:
        logits = logits[indices][:, indices]
    diag = torch.diagonal(logits)
    return 0.5 * (logits.logsumexp(1) + logits.logsumexp(0) - 2 * diag).sum()


class SoftmaxScorer:
    """Exact conditional score of the softmax loss for :func:`~composer_jest.core.selection.joint_sample`.

    The softmax loss couples every example of a batch through its normalizers, so it has no pair
    matrix. For a chosen set ``C`` and candidate ``k``, the gain ``Δ_k = L(C ∪ {k}) - L(C)`` is

        ½ [LSE_{j in C∪k} l_kj + LSE_{j in C∪k} l_jk - 2 l_kk]                 (k's own terms)
      + ½ sum_{i in C} [softplus(l_ik - R_i) + softplus(l_ki - K_i)]            (k as a new negative)

    with ``R_i = LSE_{j in C} l_ij`` and ``K_i = LSE_{j in C} l_ji``: adding ``k`` grows each
    chosen normalizer ``Z`` to ``Z + e^l``, i.e. adds ``log(1 + e^{l - log Z})``. The score of a
    candidate is ``sum_t w_t Δ_k^(t)`` over terms ``(logits_t, w_t)`` — e.g. learner with ``+1`` and
    reference with ``-1`` for learnability. A singleton's softmax loss is exactly zero, so the first
    chunk is drawn uniformly. Each update costs ``O(N |C|)``.

    Args:
        terms: ``(logits, weight)`` pairs, each logits ``N x N`` (``l_ij``: image ``i``, text ``j``).
    """

    def __init__(self, terms: Sequence[tuple[torch.Tensor, float]]):
        if not terms:
            raise ValueError('SoftmaxScorer needs at least one (logits, weight) term')
        self.terms = [(logits.float(), float(w)) for logits, w in terms]
        self.num_items = self.terms[0][0].shape[0]
        self._chosen = torch.empty(0, dtype=torch.long, device=self.terms[0][0].device)

    def initial(self) -> torch.Tensor:
        return torch.zeros(self.num_items, device=self.terms[0][0].device)

    def add(self, new: torch.Tensor) -> torch.Tensor:
        self._chosen = torch.cat([self._chosen, new])
        return sum(w * self._gain(logits) for logits, w in self.terms)

    def _gain(self, logits: torch.Tensor) -> torch.Tensor:
        c = self._chosen
        rows, cols = logits[c, :], logits[:, c]  # |C| x N (l_ik, i in C), N x |C| (l_kj, j in C)
        diag = torch.diagonal(logits)
        own = 0.5 * (
            torch.cat([cols, diag[:, None]], 1).logsumexp(1)
            + torch.cat([rows, diag[None, :]], 0).logsumexp(0)
            - 2 * diag
        )
        row_norm = rows[:, c].logsumexp(1)  # R_i
        col_norm = cols[c, :].logsumexp(0)  # K_i
        as_negative = 0.5 * (
            F.softplus(rows - row_norm[:, None]).sum(0) + F.softplus(cols - col_norm[None, :]).sum(1)
        )
        return own + as_negative
