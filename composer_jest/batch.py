"""The super-batch / sub-batch relation, in one place.

JEST streams a super-batch of ``N`` examples per rank and trains on ``b`` of them, with filter ratio
``f = 1 - b / N``. The config says ``b`` (``global_train_batch_size``) and ``f``; the loader is told ``N``
(:func:`superbatch_size`) and never sees ``f``; the algorithm draws ``b = round(N (1 - f))``
(:func:`subbatch_size`) from whatever ``N`` arrives.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ['superbatch_size', 'subbatch_size']


def _check_filter_ratio(filter_ratio: float) -> None:
    if isinstance(filter_ratio, bool) or not (isinstance(filter_ratio, (int, float)) and 0.0 <= filter_ratio < 1.0):
        raise ValueError(f'filter_ratio must be a float in [0, 1), got {filter_ratio!r}')


def superbatch_size(batch_size: int, filter_ratio: float) -> int:
    """The super-batch ``N = b / (1 - f)`` that JEST filters down to ``b``; raises if it is not an integer.

    Example:
        >>> superbatch_size(64, 0.8)
        320
        >>> superbatch_size(5, 0.3)
        Traceback (most recent call last):
        ...
        ValueError: batch_size=5 with filter_ratio=0.3 gives a super-batch of 7.1429, not an integer. Use a batch_size that is a multiple of 7 (e.g. 7), or filter_ratio=0.375 (super-batch 8) or 0.285714 (super-batch 7).
    """  # noqa: E501
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive int (the per-rank train batch), got {batch_size!r}')
    _check_filter_ratio(filter_ratio)
    n = batch_size / (1.0 - filter_ratio)
    if abs(n - round(n)) <= 1e-6:
        return int(round(n))
    step = Fraction(1.0 - filter_ratio).limit_denominator(1000).numerator  # b must be a multiple of it
    lo, hi = math.floor(n), math.ceil(n)
    raise ValueError(
        f'batch_size={batch_size} with filter_ratio={filter_ratio} gives a super-batch of {n:.4f}, not an integer. '
        f'Use a batch_size that is a multiple of {step} (e.g. {step * max(1, round(batch_size / step))}), '
        f'or filter_ratio={1 - batch_size / hi:.6g} (super-batch {hi})'
        + (f' or {1 - batch_size / lo:.6g} (super-batch {lo})' if lo > batch_size else '') + '.',
    )


def subbatch_size(superbatch: int, filter_ratio: float) -> int:
    """``b = round(N (1 - f))``, at least 1: how many of a super-batch of ``N`` JEST trains on.

    Example:
        >>> subbatch_size(320, 0.8), subbatch_size(3, 0.9)
        (64, 1)
    """
    _check_filter_ratio(filter_ratio)
    return max(1, int(round(superbatch * (1.0 - filter_ratio))))
