"""Caption lengths and length buckets for an EOT-pooled causal text tower (the EOT-trim rule, written once).

An open_clip text tower with a causal attention mask and ``argmax`` (end-of-text) pooling reads each caption's
output at its EOT token, and no position after the EOT reaches it. So caption ``i`` needs only its first
``ℓ_i = argmax(tokens_i) + 1`` positions (open_clip's EOT has the largest token id in the vocabulary), and a
batch can be encoded in **length buckets**: captions sorted by ``ℓ``, cut into at most ``K`` contiguous groups,
each group encoded at its own longest ``ℓ`` -- instead of every caption at the batch maximum (or the context).

The grouping minimises the encoded positions ``Σ_g n_g · L_g`` (``n_g`` captions of bucket ``g`` padded to its
longest caption ``L_g``) by dynamic programming over the distinct lengths, ``O(K · C²)`` for context ``C``.
The FLOP estimates (:mod:`composer_jest.models.flops`) use the same plan, so the analytic cost follows the code.

Example:
    >>> import torch
    >>> text = torch.tensor([[1, 9, 0, 0], [1, 5, 9, 0], [1, 5, 5, 9], [1, 9, 0, 0]])  # EOT = 9 (largest id)
    >>> caption_lengths(text).tolist()
    [2, 3, 4, 2]
    >>> bucket_plan(length_histogram([2, 3, 4, 2], context=4), max_buckets=2)
    [(2, 2), (4, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

__all__ = ['DEFAULT_TEXT_BUCKETS', 'DEFAULT_TEXT_BUCKET_OVERHEAD', 'caption_lengths', 'length_histogram', 'bucket_plan',
           'encoded_positions']

# Defaults of ``CLIPTowers.text_buckets`` / ``text_bucket_overhead``. On alt-text-like lengths (CC3M-like, mean 15.5
# tokens, a tail to 64), N = 1280 scored captions take 4 buckets and 20.0 positions per caption (8 free buckets:
# 17.2; one trim to the longest: 64); a trained batch of b = 256 takes 2. The overhead -- one more text-transformer
# call, in encoded positions -- is an estimate for ViT-B/16's text tower on an H100 (~150 kernel launches, ~1 ms,
# vs ~0.3 us per position at half of the bf16 peak), not a measurement: tune it with benchmarks/step_cost.py.
DEFAULT_TEXT_BUCKETS = 8
DEFAULT_TEXT_BUCKET_OVERHEAD = 2048

Plan = list[tuple[int, int]]  # (encoded length L_g, number of captions n_g), by increasing L_g


def caption_lengths(text: torch.Tensor) -> torch.Tensor:
    """Positions each caption needs, ``argmax(tokens) + 1`` (through its end-of-text token), shape ``[B]``."""
    if text.dim() != 2:
        raise ValueError(f'text must be token ids of shape [batch, context], got shape {tuple(text.shape)}')
    return text.argmax(dim=-1) + 1


def length_histogram(lengths: Union[torch.Tensor, Sequence[int]], context: int) -> list[int]:
    """``counts[ℓ]`` = number of captions of length ``ℓ``, for ``ℓ = 0..context`` (one host copy for a tensor)."""
    if isinstance(lengths, torch.Tensor):
        counts = torch.bincount(lengths.reshape(-1).long().clamp(0, context), minlength=context + 1)
        return counts.tolist()
    counts = [0] * (context + 1)
    for length in lengths:
        counts[min(max(int(length), 0), context)] += 1
    return counts


def bucket_plan(counts: Sequence[int], max_buckets: int, overhead: float = 0) -> Plan:
    """Cut the length histogram into at most ``max_buckets`` buckets minimising the encoded positions.

    Args:
        counts: ``counts[ℓ]`` captions of length ``ℓ`` (:func:`length_histogram`).
        max_buckets: ``K >= 1``; ``1`` encodes the whole batch at its longest caption.
        overhead: the cost of each bucket after the first, in encoded positions (a separate call of the
            text transformer: kernel launches, small matmuls); ``0``: as many buckets as help.

    Returns:
        ``[(L_g, n_g)]`` by increasing ``L_g``: bucket ``g`` holds the next ``n_g`` captions in length order,
        encoded at ``L_g`` positions. Minimises ``Σ_g n_g · L_g + (k − 1) · overhead`` over all cuts into
        ``k <= K`` groups.

    Raises:
        ValueError: ``max_buckets`` is not an int >= 1, ``overhead`` is negative, or a count is negative.
    """
    if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
        raise ValueError(f'max_buckets (text_buckets) must be an int >= 1, got {max_buckets!r}')
    if not overhead >= 0:
        raise ValueError(f'overhead (text_bucket_overhead) must be >= 0 positions, got {overhead!r}')
    if any(c < 0 for c in counts):
        raise ValueError('caption length counts must be >= 0')
    values = [(length, c) for length, c in enumerate(counts) if c > 0]  # counts may be fractional (expected)
    if not values:
        return []
    m = len(values)
    prefix = [0]
    for _, c in values:
        prefix.append(prefix[-1] + c)
    k_max = min(max_buckets, m)
    inf = float('inf')
    # best[k][j]: least positions for the first j distinct lengths in k buckets; cut[k][j]: start of the last.
    best = [[inf] * (m + 1) for _ in range(k_max + 1)]
    cut = [[0] * (m + 1) for _ in range(k_max + 1)]
    best[0][0] = 0
    for k in range(1, k_max + 1):
        for j in range(1, m + 1):
            length = values[j - 1][0]
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (prefix[j] - prefix[i]) * length
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, k_max + 1), key=lambda kk: (best[kk][m] + (kk - 1) * overhead, kk))  # fewest among optima
    plan: Plan = []
    j = m
    while k > 0:
        i = cut[k][j]
        plan.append((values[j - 1][0], prefix[j] - prefix[i]))
        j, k = i, k - 1
    return plan[::-1]


def encoded_positions(plan: Plan) -> int:
    """``Σ_g n_g · L_g``: the positions a bucketed encode runs (the cost proxy :func:`bucket_plan` minimises)."""
    return sum(length * n for length, n in plan)
