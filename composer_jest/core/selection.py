"""Selection math for JEST: score matrices and the joint (chunked) and independent samplers.

Pure torch, no Composer import: scores in, indices out.

A *batch score* is ``s(B) = sum_{i, j in B} S_ij`` for a pair score matrix ``S`` (``N x N``). JEST
draws sub-batches approximately ``∝ exp(s(B))`` (Evans et al. 2024, Algorithm 1): the first chunk
is drawn without replacement ``∝ exp(S_kk)``; every later chunk ``∝ exp(c_k)`` where

    c_k = s(C ∪ {k}) - s(C) = S_kk + sum_{j in C} (S_kj + S_jk)

is the *conditional* score of candidate ``k`` given the already chosen set ``C``. Draws without
replacement ``∝ exp(c)`` are Gumbel-top-k: ``topk(c + Gumbel noise)``.

The softmax (InfoNCE) loss does not split into pair terms; its conditional score is supplied by a
:class:`ConditionalScorer` (see :mod:`composer_jest.core.losses`) and sampled by the same loop.

``joint_sample`` / ``independent_sample`` on an ``N x N`` matrix are the dense reference; training
uses :func:`blockwise_sample` with the matrix-free scorers of :mod:`composer_jest.core.scoring`.

Randomness: one seed per selection is drawn from the caller's (checkpointed, CPU) generator; group
(rank) ``g`` then draws all of its Gumbel noise, ``[chunks, group_size]``, at once on the scores'
device from a generator seeded by ``(seed, g)`` (:func:`gumbel_noise`). The dense samplers here and
the blockwise one (:func:`blockwise_sample`, where each rank holds only its own group) therefore
draw the same indices for the same generator state, and no noise crosses host and device per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Protocol

import numpy as np
import torch

__all__ = [
    'SCORE_TERMS',
    'SCORE_METHODS',
    'SELECTION_METHODS',
    'ConditionalScorer',
    'BlockScorer',
    'PairScorer',
    'score_matrix',
    'joint_sample',
    'independent_sample',
    'chunk_sizes',
    'batch_score',
    'blockwise_sample',
    'blockwise_draw',
    'draw_seed',
    'gumbel_noise',
    'selection_noise',
    'validate_sizes',
    'validate_temperature',
]

# Which model's loss each score uses, and with which sign: S = sum_m w_m L_m (uniform: S = 0).
SCORE_TERMS: dict[str, tuple[tuple[str, float], ...]] = {
    'learnability': (('learner', 1.0), ('reference', -1.0)),
    'easy_reference': (('reference', -1.0),),
    'hard_learner': (('learner', 1.0),),
    'uniform': (),
}
SCORE_METHODS = tuple(SCORE_TERMS)
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
    losses = {'learner': learner_loss, 'reference': reference_loss}
    for model, _ in SCORE_TERMS[score]:
        if losses[model] is None:
            raise ValueError(f'score={score!r} needs {model}_loss')
    if not SCORE_TERMS[score]:
        ref = learner_loss if learner_loss is not None else reference_loss
        if ref is None:
            raise ValueError("score='uniform' needs at least one loss matrix to take its size from")
        return torch.zeros_like(ref)
    return sum(w * losses[model] for model, w in SCORE_TERMS[score])


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
    validate_sizes(scores.shape[0], n_select, n_chunks, n_groups)
    # NaN/±inf propagate through a sum; only an overflowing sum falls through to the elementwise check.
    if not torch.isfinite(scores.sum()) and not torch.isfinite(scores).all():
        raise ValueError('scores must be finite (found NaN or inf); check the loss inputs')


def validate_sizes(n: int, n_select: int, n_chunks: int, n_groups: int) -> None:
    """Raise ``ValueError`` naming ``n_select``, ``n_chunks`` or ``n_groups`` if it does not fit ``N = n``."""
    if not isinstance(n_select, int) or not 1 <= n_select <= n:
        raise ValueError(f'n_select must be an int in [1, N={n}], got {n_select!r}')
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f'n_chunks must be an int >= 1, got {n_chunks!r}')
    if not isinstance(n_groups, int) or n_groups < 1 or n % n_groups or n_select % n_groups:
        raise ValueError(
            f'n_groups must be an int >= 1 dividing both N={n} and n_select={n_select}, got {n_groups!r}',
        )


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """The one value a selection draws from the caller's generator (its checkpointed state is the replay key)."""
    if not isinstance(generator, torch.Generator):
        # no silent fallback to torch's global RNG: selections must replay from a checkpointed generator
        raise ValueError(f'generator must be a seeded torch.Generator, got {generator!r}')
    # a CPU generator (as JEST's): int() reads host memory, no device sync
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def gumbel_noise(seed: int, group: int, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)`` for one group (rank), float32, drawn at once on ``device``.

    Depends only on ``(seed, group, shape, device type)``: any process can draw its own group's noise
    without drawing anyone else's.

    Example:
        >>> a = gumbel_noise(7, 1, (2, 5), 'cpu')
        >>> torch.equal(a, gumbel_noise(7, 1, (2, 5), 'cpu')), torch.equal(a, gumbel_noise(7, 0, (2, 5), 'cpu'))
        (True, False)
    """
    mixed = int(np.random.SeedSequence([seed, group]).generate_state(1, np.uint64)[0])
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed)
    u = torch.rand(tuple(shape), generator=gen, device=device).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def selection_noise(generator: Optional[torch.Generator], group: int, quota: int, n_chunks: int, joint: bool,
                    n: int, device: torch.device | str) -> torch.Tensor:
    """The Gumbel noise of one :func:`blockwise_sample` draw, ``[chunks, n]``: draws its one value from ``generator``.

    Example:
        >>> a = selection_noise(torch.Generator().manual_seed(0), 0, 4, 2, True, 10, 'cpu')
        >>> a.shape, torch.equal(a, selection_noise(torch.Generator().manual_seed(0), 0, 4, 2, True, 10, 'cpu'))
        (torch.Size([2, 10]), True)
    """
    chunks = len(chunk_sizes(quota, n_chunks if joint else 1))
    return gumbel_noise(draw_seed(generator), group, (chunks, n), device)


def _draw_chunk(cond: torch.Tensor, chosen: torch.Tensor, noise: torch.Tensor, size: int,
                temperature: float) -> torch.Tensor:
    """Gumbel-top-k along the last dim: ``size`` unchosen items drawn without replacement ``∝ exp(cond / T)``.

    Shared by the dense and the blockwise sampler, so both do the same float arithmetic. ``topk`` is
    invariant to a shift of the logits, so no max is subtracted (a max over the finite entries would
    sync the device); chosen items are ``-inf`` and never drawn. Marks the drawn items in ``chosen``.
    """
    logits = (cond / temperature).masked_fill(chosen, -math.inf) + noise
    new = torch.topk(logits, size, dim=-1).indices
    chosen.scatter_(-1, new, True)
    return new


def _chunked_sample(
    scorer: ConditionalScorer,
    n_select: int,
    n_chunks: int,
    generator: Optional[torch.Generator],
    n_groups: int,
    temperature: float,
    joint: bool,
) -> torch.Tensor:
    seed = draw_seed(generator)
    n = scorer.num_items
    group_size, quota = n // n_groups, n_select // n_groups
    sizes = chunk_sizes(quota, n_chunks)
    cond = scorer.initial()
    # [chunks, groups, group_size]: group g's noise is what rank g draws alone in blockwise_sample
    noise = torch.stack([gumbel_noise(seed, g, (len(sizes), group_size), cond.device) for g in range(n_groups)], 1)
    chosen = torch.zeros(n_groups, group_size, dtype=torch.bool, device=cond.device)
    offsets = torch.arange(n_groups, device=cond.device)[:, None] * group_size
    picked: list[torch.Tensor] = []
    for t, size in enumerate(sizes):
        # Per-group quota: every group (rank) gets its share of every chunk.
        new = (_draw_chunk(cond.view(n_groups, group_size), chosen, noise[t], size, temperature) + offsets).flatten()
        picked.append(new)
        if joint and t < len(sizes) - 1:
            cond = scorer.add(new)
    return torch.cat(picked)


class BlockScorer(Protocol):
    """What :func:`blockwise_sample` needs: conditional scores of *this rank's* candidates only.

    ``add`` receives this rank's newly chosen (local) indices; a distributed scorer exchanges what it
    needs about every rank's new chunk itself (e.g. an all-gather of their embeddings).
    """

    num_items: int

    def initial(self) -> torch.Tensor:
        """``c_k`` of the local candidates given the empty set, shape ``[N_local]``."""

    def add(self, new: torch.Tensor, need_cond: bool) -> Optional[torch.Tensor]:
        """Add every rank's new chunk (``new``: this rank's part); the updated ``c`` if ``need_cond``.

        ``need_cond=False`` (after the last chunk, or the whole independent draw at once): only the
        scorer's own statistics of the chosen set are updated; it may gather ``new`` in pieces.
        """


def blockwise_sample(
    scorer: BlockScorer,
    quota: int,
    n_chunks: int,
    generator: Optional[torch.Generator],
    *,
    group: int = 0,
    temperature: float = 1.0,
    joint: bool = True,
    add_all: bool = False,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """This rank's share of a joint (or independent) draw: ``quota`` local indices, in draw order.

    The same draw as :func:`joint_sample` / :func:`independent_sample` with ``n_groups`` = world size,
    restricted to group ``group``, when every rank passes a generator in the same state: the rank draws
    only its own group's noise (:func:`gumbel_noise`) and its own quota, and learns about the other
    ranks' choices only through ``scorer.add``.

    Args:
        scorer: conditional scores of the local candidates.
        quota: items this rank draws (``n_select / world_size``).
        n_chunks: chunks of the joint draw (ignored by ``joint=False``: one chunk).
        generator: the seeded generator, in the same state on every rank (one value is drawn).
        group: this rank's index.
        temperature: draw ``∝ exp(c / temperature)``.
        joint: condition each chunk on the chosen set; ``False`` draws once ``∝ exp(c_k)``.
        add_all: also add the last chunk (joint) or the whole draw (independent) with
            ``need_cond=False``, so the scorer has seen the full selected set (statistics of it).
        noise: the draw's Gumbel noise, from :func:`selection_noise` with the same arguments (``generator`` is
            then not used); drawn here when ``None``. Passing it keeps the rest free of host work (a compiled
            or graph-captured selection).
    """
    validate_sizes(scorer.num_items, quota, n_chunks, 1)
    validate_temperature(temperature)
    sizes = chunk_sizes(quota, n_chunks if joint else 1)
    if noise is None:
        noise = selection_noise(generator, group, quota, n_chunks, joint, scorer.num_items, scorer.initial().device)
    elif tuple(noise.shape) != (len(sizes), scorer.num_items):
        raise ValueError(f'noise must have shape (chunks, N) = {(len(sizes), scorer.num_items)} '
                         f'(selection_noise), got {tuple(noise.shape)}')
    return blockwise_draw(scorer, sizes, noise, temperature, joint, add_all)


def blockwise_draw(scorer: BlockScorer, sizes: Sequence[int], noise: torch.Tensor, temperature: float, joint: bool,
                   add_all: bool) -> torch.Tensor:
    """:func:`blockwise_sample` after its checks: chunk ``t`` draws ``sizes[t]`` items with ``noise[t]``.

    Tensor work only (no argument checks, no host reads), so a compiler can trace it whole.
    """
    cond = scorer.initial()
    chosen = torch.zeros(scorer.num_items, dtype=torch.bool, device=cond.device)
    picked: list[torch.Tensor] = []
    for t, size in enumerate(sizes):
        new = _draw_chunk(cond, chosen, noise[t], size, temperature)
        picked.append(new)
        last = t == len(sizes) - 1
        if joint and (add_all or not last):
            cond = scorer.add(new, need_cond=not last)
    if add_all and not joint:
        scorer.add(picked[0], need_cond=False)
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
        validate_sizes(scorer.num_items, n_select, n_chunks, n_groups)
    validate_temperature(temperature)
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
        validate_sizes(scorer.num_items, n_select, 1, n_groups)
    validate_temperature(temperature)
    return _chunked_sample(scorer, n_select, 1, generator, n_groups, temperature, joint=False)


def validate_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite float > 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f'temperature must be a finite float > 0, got {temperature!r}')
