"""Offline reference filtering: score every example of a pool once with a frozen reference, keep the best.

This is the baseline users run before (or instead of) JEST, as DataComp and DFN filter web data: embed each
image-text pair with a reference CLIP model, compute a per-example score, and keep the top fraction of the pool
(or everything at or above a threshold); then train uniformly on what is kept. Pure torch, no I/O:
``composer-jest filter`` (:mod:`composer_jest.run.filter`) feeds it features and writes the kept rows.

Scores (:data:`SCORES`), for example ``i`` with image / text embeddings ``x_i``, ``y_i``:

* ``'clip'`` (default, the *CLIP score* of DataComp / DFN): the cosine similarity of the pair,
  ``s_i = x_i·y_i / (|x_i| |y_i|)``, in ``[-1, 1]``.
* ``'sigmoid'``: the negative of the positive-pair term of the sigmoid (SigLIP) loss, i.e. the reference's
  log-probability that the pair matches, ``s_i = log σ(t cos_i + b) = -softplus(-(t cos_i + b))``, in
  ``(-inf, 0]``, with the reference's logit scale ``t > 0`` (the scale itself, not its log) and bias ``b``.
  For ``t > 0`` it is a strictly increasing function of the CLIP score, so ``keep`` selects the same rows (up to
  float ties); it puts ``threshold`` in the units of the reference's own loss.

There is no per-example *softmax* score: the softmax (InfoNCE) loss of a pair depends on the other examples in
its batch, so it is not a property of the example alone and would change with how the pool is batched.

Keep rule (:func:`keep_indices`): exactly one of ``keep`` (a fraction in ``(0, 1]``: the
``k = max(1, floor(keep N + 1/2))`` highest scores; ties broken by pool index, the lower index first) or
``threshold`` (every example with ``s_i >= threshold``). The kept indices are returned in pool order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['SCORES', 'SCORE_COLUMN', 'reference_scores', 'keep_count', 'keep_indices']

SCORES = ('clip', 'sigmoid')
# The column ``composer-jest filter`` adds to the kept rows: each example's score (float64).
SCORE_COLUMN = 'filter_score'


def _as_float(name: str, value: Optional[torch.Tensor | float]) -> float:
    if value is None:
        raise ValueError(f"score='sigmoid' needs {name} (the reference's logit {name.split('_')[1]}), got None")
    out = float(torch.as_tensor(value, dtype=torch.float64).reshape(-1)[0]) if torch.is_tensor(value) else value
    if isinstance(out, bool) or not isinstance(out, (int, float)) or not math.isfinite(out):
        raise ValueError(f'{name} must be a finite number, got {value!r}')
    return float(out)


def reference_scores(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    score: str = 'clip',
    logit_scale: Optional[torch.Tensor | float] = None,
    logit_bias: Optional[torch.Tensor | float] = None,
) -> torch.Tensor:
    """Per-example reference scores ``[N]`` (float32) of ``N`` image-text pairs; higher is better.

    ``'clip'``: ``s_i = cos(x_i, y_i)``; ``'sigmoid'``: ``s_i = log σ(t cos(x_i, y_i) + b)`` (module docstring).
    The features need not be normalised (they are, here; cached ``ref_*`` columns already are, in float16).
    Rows are independent, so a pool may be scored in any chunks and concatenated.

    Args:
        image_features, text_features: ``[N, d]`` reference embeddings of the images and captions.
        score: one of :data:`SCORES`.
        logit_scale: ``t > 0``, the scale itself (``logit_scale.exp()`` of an open_clip model); ``'sigmoid'`` only.
        logit_bias: ``b``; ``'sigmoid'`` only (``0`` for a model without a bias).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
        >>> y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [4.0, 3.0]])
        >>> reference_scores(x, y)
        tensor([1.0000, 0.0000, 0.9600])
        >>> reference_scores(x, y, score='sigmoid', logit_scale=10.0, logit_bias=-10.0)
        tensor([ -0.6931, -10.0000,  -0.9130])
        >>> reference_scores(x, y, score='dot')
        Traceback (most recent call last):
        ...
        ValueError: score must be one of ('clip', 'sigmoid'), got 'dot'
    """
    if score not in SCORES:
        raise ValueError(f'score must be one of {SCORES}, got {score!r}')
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError('image_features and text_features must both be [N, d] of the same shape, got '
                         f'{tuple(image_features.shape)} and {tuple(text_features.shape)}')
    x = F.normalize(image_features.float(), dim=-1)
    y = F.normalize(text_features.float(), dim=-1)
    cos = (x * y).sum(dim=-1)
    if score == 'clip':
        return cos
    scale, bias = _as_float('logit_scale', logit_scale), _as_float('logit_bias', logit_bias)
    if scale <= 0:
        raise ValueError(f'logit_scale must be the positive scale t itself (not its log), got {scale}')
    return -F.softplus(-(scale * cos.double() + bias)).float()


def keep_count(num_examples: int, keep: float) -> int:
    """How many of ``num_examples`` a fraction ``keep`` in ``(0, 1]`` keeps: ``max(1, floor(keep N + 1/2))``.

    Example:
        >>> keep_count(10, 0.3), keep_count(10, 0.25), keep_count(3, 0.01), keep_count(7, 1.0)
        (3, 3, 1, 7)
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f'keep must be a fraction in (0, 1] (e.g. 0.3 keeps the top 30%), got {keep!r}')
    if num_examples == 0:
        return 0
    return max(1, min(num_examples, math.floor(keep * num_examples + 0.5)))


def keep_indices(scores: torch.Tensor, *, keep: Optional[float] = None,
                 threshold: Optional[float] = None) -> torch.Tensor:
    """The pool indices to keep (int64, ascending), by ``keep`` (top fraction) or ``threshold`` (``s_i >= T``).

    Exactly one of ``keep`` and ``threshold``. With ``keep``, the ``k`` (:func:`keep_count`) highest scores;
    among equal scores the lower index is kept first, so the result is deterministic. Scores must be finite.

    Example:
        >>> s = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
        >>> keep_indices(s, keep=0.4)  # top 2 of 5
        tensor([1, 3])
        >>> keep_indices(s, keep=0.2)  # a tie at 0.9: the lower index wins
        tensor([1])
        >>> keep_indices(s, threshold=0.5)
        tensor([1, 2, 3])
        >>> keep_indices(s, keep=0.5, threshold=0.5)
        Traceback (most recent call last):
        ...
        ValueError: give exactly one of keep (a fraction in (0, 1]) and threshold (a score), got keep=0.5 and threshold=0.5
    """  # noqa: E501
    if (keep is None) == (threshold is None):
        raise ValueError('give exactly one of keep (a fraction in (0, 1]) and threshold (a score), '
                         f'got keep={keep!r} and threshold={threshold!r}')
    if scores.dim() != 1:
        raise ValueError(f'scores must be a 1-d tensor [N], got shape {tuple(scores.shape)}')
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f'scores must be finite; {bad.numel()} are not, e.g. at pool index {bad[:5].tolist()}')
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f'threshold must be a finite number (a score), got {threshold!r}')
        return (scores >= threshold).nonzero().flatten()
    k = keep_count(scores.numel(), keep)
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: ascending index
    return torch.sort(order[:k]).values
