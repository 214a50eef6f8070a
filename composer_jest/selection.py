"""Selection math for JEST: score matrices and the joint (chunked) and independent samplers.

Pure torch, no Composer import: scores in, indices out.

A *batch score* is ``s(B) = sum_{i, j in B} S_ij`` for a pair score matrix ``S`` (``N x N``). JEST
draws sub-batches approximately ``∝ exp(s(B))`` (Evans et al. 2024, Algorithm 1): the first chunk
is drawn without replacement ``∝ exp(S_kk)``; every later chunk ``∝ exp(c_k)`` where

    c_k = s(C ∪ {k}) - s(C) = S_kk + sum_{j in C} (S_kj + S_jk)

is the *conditional* score of candidate ``k`` given the already chosen set ``C``. Draws without
replacement ``∝ exp(c)`` are Gumbel-top-k: ``topk(c + Gumbel noise)``.

The softmax (InfoNCE) loss does not split into pair terms; its conditional score is supplied by a
:class:`ConditionalScorer` (see :mod:`composer_jest.losses`) and sampled by the same loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Protocol

import torch

__all__ = [
    'SCORE_METHODS',
    'SELECTION_METHODS',
    'ConditionalScorer',
    'PairScorer',
    'score_matrix',
    'joint_sample',
    'independent_sample',
    'chunk_sizes',
    'batch_score',
]

SCORE_METHODS = ('learnability', 'easy_reference', 'hard_learner', 'uniform')
SELECTION_METHODS = ('joint', 'independent')


def score_matrix(
    score: str,
    learner_loss: Optional[torch.Tensor] = None,
    reference_loss: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pair score matrix ``S`` from per-pair loss matrices.

    Args:
        score: ``learnability`` (``L_learner - L_reference``), ``easy_reference`` (``-L_reference``),
            ``hard_learner`` (``L_learner``) or ``uniform`` (zeros: every batch equally likely).
        learner_loss: ``N x N`` per-pair learner loss (needed by learnability, hard_learner).
        reference_loss: ``N x N`` per-pair reference loss (needed by learnability, easy_reference).

    Example:
        >>> import torch
        >>> score_matrix('learnability', torch.ones(3, 3), torch.zeros(3, 3)).sum().item()
        9.0
    """
    if score not in SCORE_METHODS:
        raise ValueError(f'score must be one of {SCORE_METHODS}, got {score!r}')
    needs_learner = score in ('learnability', 'hard_learner')
    needs_reference = score in ('learnability', 'easy_reference')
    if needs_learner and learner_loss is None:
        raise ValueError(f'score={score!r} needs learner_loss')
    if needs_reference and reference_loss is None:
        raise ValueError(f'score={score!r} needs reference_loss')
    if score == 'learnability':
        return learner_loss - reference_loss
    if score == 'hard_learner':
        return learner_loss
    if score == 'easy_reference':
        return -reference_loss
    ref = learner_loss if learner_loss is not None else reference_loss
    if ref is None:
        raise ValueError("score='uniform' needs at least one loss matrix to take its size from")
    return torch.zeros_like(ref)


def batch_score(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``s(B) = sum_{i, j in B} S_ij``."""
    return scores[indices][:, indices].sum()


class ConditionalScorer(Protocol):
    """What the joint sampler needs: the score gain of each candidate given the chosen set."""

    num_items: int

    def initial(self) -> torch.Tensor:
        """``c_k`` given the empty set, shape ``[N]``."""

    def add(self, new: torch.Tensor) -> torch.Tensor:
        """Add ``new`` indices to the chosen set; return the updated ``c``, shape ``[N]``."""


class PairScorer:
    """Conditional scores of a pair-decomposable batch score, updated incrementally.

    ``c`` starts at ``diag(S)``; adding a chunk ``D`` adds ``S[:, D].sum(1) + S[D, :].sum(0)``,
    so a whole draw costs ``O(N * n_select)`` and never builds an ``N x N x chunks`` temporary.
    """

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
        self.num_items = scores.shape[0]
        self._cond = torch.diagonal(scores).clone()

    def initial(self) -> torch.Tensor:
        return self._cond

    def add(self, new: torch.Tensor) -> torch.Tensor:
        self._cond += self.scores.index_select(1, new).sum(1) + self.scores.index_select(0, new).sum(0)
        return self._cond


def chunk_sizes(n_select: int, n_chunks: int) -> list[int]:
    """Split ``n_select`` into ``min(n_chunks, n_select)`` near-equal chunks (larger ones first)."""
    n = min(n_chunks, n_select)
    base, extra = divmod(n_select, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _validate(scores: torch.Tensor, n_select: int, n_chunks: int = 1, n_groups: int = 1) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f'scores must be a square N x N matrix, got shape {tuple(scores.shape)}')
    _validate_sizes(scores.shape[0], n_select, n_chunks, n_groups)
    # NaN/±inf propagate through a sum; only an overflowing sum falls through to the elementwise check.
    if not torch.isfinite(scores.sum()) and not torch.isfinite(scores).all():
        raise ValueError('scores must be finite (found NaN or inf); check the loss inputs')


def _validate_sizes(n: int, n_select: int, n_chunks: int, n_groups: int) -> None:
    if not isinstance(n_select, int) or not 1 <= n_select <= n:
        raise ValueError(f'n_select must be an int in [1, N={n}], got {n_select!r}')
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f'n_chunks must be an int >= 1, got {n_chunks!r}')
    if not isinstance(n_groups, int) or n_groups < 1 or n % n_groups or n_select % n_groups:
        raise ValueError(
            f'n_groups must be an int >= 1 dividing both N={n} and n_select={n_select}, got {n_groups!r}',
        )


def _gumbel(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    # -log(-log U), U ~ Uniform(0, 1); drawn on the generator's device, then moved.
    gen_device = generator.device if generator is not None else torch.device('cpu')
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).to(device)


def _gumbel_topk(logits: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``k`` indices drawn without replacement ``∝ exp(logits)``; ``-inf`` entries are never drawn."""
    # Shift by the max: the draw is invariant to it and exp never overflows downstream.
    finite = torch.isfinite(logits)
    shifted = logits.double() - logits[finite].max().double()
    perturbed = shifted + _gumbel(logits.shape, generator, logits.device)
    return torch.topk(perturbed, k).indices


def _chunked_sample(
    scorer: ConditionalScorer,
    n_select: int,
    n_chunks: int,
    generator: Optional[torch.Generator],
    n_groups: int,
    temperature: float,
    joint: bool,
) -> torch.Tensor:
    if not isinstance(generator, torch.Generator):
        # no silent fallback to torch's global RNG: selections must replay from a checkpointed generator
        raise ValueError(f'generator must be a seeded torch.Generator, got {generator!r}')
    n = scorer.num_items
    group_size, quota = n // n_groups, n_select // n_groups
    cond = scorer.initial()
    chosen = torch.zeros(n, dtype=torch.bool, device=cond.device)
    picked: list[torch.Tensor] = []
    for size in chunk_sizes(quota, n_chunks):
        logits = (cond / temperature).masked_fill(chosen, -math.inf).view(n_groups, group_size)
        # Per-group quota: every group (rank) gets its share of every chunk.
        new = torch.cat([
            _gumbel_topk(logits[g], size, generator) + g * group_size for g in range(n_groups)
        ])
        chosen[new] = True
        picked.append(new)
        if joint:
            cond = scorer.add(new)
    return torch.cat(picked)


def joint_sample(
    scores: torch.Tensor | ConditionalScorer,
    n_select: int,
    n_chunks: int = 16,
    generator: Optional[torch.Generator] = None,
    n_groups: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Draw a sub-batch with JEST's chunked joint sampler.

    Args:
        scores: ``N x N`` pair score matrix ``S`` (e.g. learnability), or a
            :class:`ConditionalScorer` for scores that are not pair sums (softmax loss).
        n_select: sub-batch size ``b`` (``1 <= b <= N``).
        n_chunks: number of sequential chunks (the paper uses 16); when ``n_select`` is not a
            multiple, chunk sizes differ by one.
        generator: the seeded source of all randomness (required; ``None`` raises).
        n_groups: split the items into ``n_groups`` contiguous equal blocks (ranks) and draw
            ``n_select / n_groups`` from each, chunk by chunk, with conditionals over the whole set.
        temperature: sample ``∝ exp(s(B) / temperature)``.

    Returns:
        ``LongTensor[n_select]`` of distinct indices, in the order they were drawn (per chunk,
        group by group).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> S = torch.randn(32, 32)
        >>> idx = joint_sample(S, 8, n_chunks=4, generator=g)
        >>> idx.shape, idx.unique().numel()
        (torch.Size([8]), 8)
    """
    if isinstance(scores, torch.Tensor):
        _validate(scores, n_select, n_chunks, n_groups)
        scorer: ConditionalScorer = PairScorer(scores)
    else:
        scorer = scores
        _validate_sizes(scorer.num_items, n_select, n_chunks, n_groups)
    _validate_temperature(temperature)
    return _chunked_sample(scorer, n_select, n_chunks, generator, n_groups, temperature, joint=True)


def independent_sample(
    scores: torch.Tensor | ConditionalScorer,
    n_select: int,
    generator: Optional[torch.Generator] = None,
    n_groups: int = 1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-example prioritisation baseline: draw without replacement ``∝ exp(S_kk)`` (no joint term).

    Uses the same scores as :func:`joint_sample` but ignores interactions between examples.

    Example:
        >>> import torch
        >>> S = torch.diag(torch.tensor([0., 0., 50., 50.]))
        >>> sorted(independent_sample(S, 2, generator=torch.Generator().manual_seed(0)).tolist())
        [2, 3]
    """
    if isinstance(scores, torch.Tensor):
        _validate(scores, n_select, 1, n_groups)
        scorer: ConditionalScorer = PairScorer(scores)
    else:
        scorer = scores
        _validate_sizes(scorer.num_items, n_select, 1, n_groups)
    _validate_temperature(temperature)
    return _chunked_sample(scorer, n_select, 1, generator, n_groups, temperature, joint=False)


def _validate_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'temperature must be a finite float > 0, got {temperature!r}')
