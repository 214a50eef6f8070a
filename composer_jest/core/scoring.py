"""JEST's scoring core: learner/reference features in, this rank's selection out — never an N x N matrix.

Pure torch, no Composer import; the one collective it needs (an all-gather) is passed in.

Each rank holds the features of its own ``N`` candidates and draws its own quota ``b`` of every chunk
(:func:`~composer_jest.core.selection.blockwise_sample`); ``world_size = 1`` is local selection. After each
chunk, every rank all-gathers the embeddings of the chunk just chosen (``chunk_g x d`` per tensor, not
the super-batch) and updates the conditional scores of *its own* candidates against it:

* **sigmoid** (pair-decomposable): ``c_k += sum_{j in D} (S_kj + S_jk)`` over the new chunk ``D``, with
  ``S_kj = sum_m w_m softplus(t_m x_k·y_j + b_m)`` (``m``: the score's models, see ``SCORE_TERMS``).
  Memory ``O(N x chunk_g)``, compute ``O(N x b_g x d)`` per rank for the whole draw.
* **softmax** (exact; no pair terms): per model, running normalisers ``a_k = LSE_{j in C} l_kj`` and
  ``a'_k = LSE_{j in C} l_jk`` of every local item against the chosen set ``C`` give ``k``'s own loss;
  ``k`` as a new negative of every chosen ``i`` adds ``½ [softplus(l_ik - R_i) + softplus(l_ki - K_i)]``
  where ``R_i = a_i``, ``K_i = a'_i`` are the chosen items' normalisers, all-gathered each chunk. Those
  change with every chunk, so each chunk costs ``O(N x |C| x d)`` compute (``O(N x b_g x d x chunks / 2)``
  in all) and every rank keeps the chosen set's embeddings (``b_g x d`` per tensor); temporaries stay
  blockwise.

* **other objectives** (``dcl``, ``hcl``, ``triplet``, ``npair``; :mod:`composer_jest.core.objectives`): the softmax
  scheme with the objective's per-anchor statistic of its negatives (LSE, max, count...) in place of the
  normaliser. With false negatives or a negatives queue every objective is scored from ``N x N`` logits at one
  rank (``scope='global'`` fails early, :func:`check_scope`). The scorers are in :mod:`composer_jest.core.blockwise`
  (``SigmoidBlocks``, ``SoftmaxBlocks``, ``AnchorBlocks``, ``DenseBlocks``).

Statistics (when both models are given): the learnability ``s(B) / b_g`` of the selected batch is exact
(accumulated chunk by chunk from the same blocks). The uniform-batch figure is an estimate from each
rank's own super-batch (the loader shuffles, so its items are a uniform sample): sigmoid
``mean_k S_kk + (b_g - 1) x`` the mean off-diagonal ``S_ij`` over pairs inside consecutive blocks of
``STAT_BLOCK`` local items; softmax, the mean of ``s(block) / b`` over consecutive blocks of ``b`` local
items. Both are exact at one rank with ``N <= STAT_BLOCK`` (sigmoid) or always (softmax, one rank).

Independent selection with the softmax loss draws ``∝ exp(loss of k in its own rank's super-batch)``
(the normalisers run over the ``N`` local items, not the ``N x world`` global ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

from composer_jest.core.batch import Features
from composer_jest.core.blockwise import (
    STAT_BLOCK,
    STAT_TERMS,
    AllGather,
    AnchorBlocks,
    Comm,
    DenseBlocks,
    ScaledFeatures,
    SigmoidBlocks,
    SoftmaxBlocks,
)
from composer_jest.core.objectives import QUEUE_KEYS, Objective, build_objective, loss_names
from composer_jest.core.selection import (
    SCORE_METHODS,
    SCORE_TERMS,
    SELECTION_METHODS,
    blockwise_draw,
    chunk_sizes,
    selection_noise,
    validate_sizes,
    validate_temperature,
)

__all__ = ['Features', 'AllGather', 'Selection', 'STAT_BLOCK', 'conditional_scorer', 'jest_select', 'selection_flops',
           'check_scope']


class Selection(NamedTuple):
    """What :func:`jest_select` returns."""

    indices: torch.Tensor  # this rank's picks: positions in its own super-batch, in draw order
    global_indices: torch.Tensor  # every rank's picks as rank * N + position, per chunk rank by rank
    stats: dict[str, torch.Tensor]  # learnability_superbatch / learnability_selected (0-dim tensors)


def check_scope(objective: Objective, world_size: int, masked: bool = False) -> None:
    """Raise ``ValueError`` if ``objective`` cannot be scored across ``world_size > 1`` ranks (``scope='global'``)."""
    if world_size > 1 and (not objective.blockwise or masked):
        raise ValueError(
            f'loss {objective.spec()!r} cannot be scored across ranks (scope=global, world_size={world_size}): the '
            f'matrix-free global path takes every registered loss ({loss_names()}) but without false_negatives or '
            "a negatives queue; use scope='local' for this loss")


def conditional_scorer(
    learner: Optional[Features],
    reference: Optional[Features],
    *,
    score: str = 'learnability',
    loss: Any = 'sigmoid',
    joint: bool = True,
    quota: int,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Optional[AllGather] = None,
    track: bool = False,
) -> SigmoidBlocks | SoftmaxBlocks | AnchorBlocks:
    """The blockwise :class:`~composer_jest.core.selection.BlockScorer` of this rank's candidates.

    ``loss``: a loss spec without false negatives or a queue. ``track``: also accumulate the learnability
    statistics (needs both models). ``quota``: this rank's sub-batch size (the softmax and anchor scorers keep
    the chosen set's embeddings, ``quota x world_size`` rows).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> f = {'image_features': F.normalize(torch.randn(6, 4), dim=-1),
        ...      'text_features': F.normalize(torch.randn(6, 4), dim=-1), 'logit_scale': 10., 'logit_bias': -10.}
        >>> scorer = conditional_scorer(f, None, score='hard_learner', quota=2)
        >>> scorer.add(torch.tensor([0]), need_cond=True).shape
        torch.Size([6])
    """
    if score not in SCORE_METHODS:
        raise ValueError(f'score must be one of {SCORE_METHODS}, got {score!r}')
    objective = build_objective(loss)
    if not objective.blockwise:
        raise ValueError(f'loss {objective.spec()!r} has no matrix-free scorer (false negatives or a negatives '
                         'queue): jest_select scores it from N x N logits')
    comm = Comm(rank, world_size, all_gather)
    # the objective's scale (a fixed temperature; 1 for cosine losses) replaces the model's
    given = {name: ({**f, 'logit_scale': objective.scale(f)} if f is not None else None)
             for name, f in (('learner', learner), ('reference', reference))}
    for name, _ in SCORE_TERMS[score]:
        if given[name] is None:
            raise ValueError(f'score={score!r} needs {name} features')
    if track and (learner is None or reference is None):
        raise ValueError('the learnability statistics need both learner and reference features')
    if learner is None and reference is None:
        raise ValueError('need learner or reference features (the super-batch size is taken from them)')
    anchor = (learner or reference)['image_features']
    needed = [name for name in ('learner', 'reference')
              if name in dict(SCORE_TERMS[score]) or (track and name in dict(STAT_TERMS))]
    models = {name: ScaledFeatures.build(given[name], name, objective.name) for name in needed}
    sizes = {name: m.xs.shape[0] for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f'learner and reference features must cover the same super-batch, got sizes {sizes}')
    args = (models, score, track, comm, anchor.shape[0], anchor.device)
    if objective.name == 'sigmoid':
        return SigmoidBlocks(*args)
    if objective.name == 'softmax':
        return SoftmaxBlocks(*args, joint=joint, quota=quota, sub_batch=quota)
    scales = {name: objective.scale(given[name]) for name in needed}
    return AnchorBlocks(*args, joint=joint, quota=quota, objective=objective, scales=scales)


def jest_select(
    learner: Optional[Features],
    reference: Optional[Features],
    n_select: int,
    *,
    score: str = 'learnability',
    selection: str = 'joint',
    loss: str = 'sigmoid',
    n_chunks: int = 16,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Optional[AllGather] = None,
    mask: Optional[torch.Tensor] = None,
    compile: Optional[dict] = None,
) -> Selection:
    """Score this rank's super-batch and draw its ``n_select`` examples of a (possibly global) selection.

    At ``world_size > 1`` every rank calls this with its own ``N`` candidates' features and a generator
    in the same state; together they draw what :func:`~composer_jest.core.selection.joint_sample` (or
    ``independent_sample``) draws on the concatenated super-batch with ``n_groups = world_size``, each
    rank computing only its own candidates' scores (see the module docstring for the math and costs).

    Args:
        learner, reference: :class:`Features` of this rank's super-batch; either may be ``None`` if the
            score does not use it (``SCORE_TERMS``). With both, the learnability statistics are returned.
        n_select: this rank's sub-batch size ``b``.
        score, selection, n_chunks, temperature: see :class:`~composer_jest.jest.algorithm.JEST`.
        loss: a loss spec (:func:`~composer_jest.core.objectives.build_objective`): every registered loss runs
            matrix-free (any world size); with ``mask`` or a queue in the features, through ``N x N`` logits at
            world size 1 (:func:`check_scope`).
        mask: ``[N, N]`` bool false negatives (:class:`~composer_jest.core.objectives.FalseNegatives`), or ``None``.
            Features that carry a negatives queue (``QUEUE_KEYS``) count it in that model's loss.
        generator: seeded (CPU) generator; one value is drawn per call.
        rank, world_size, all_gather: this rank, the number of ranks selecting together, and the
            all-gather (``composer.utils.dist.all_gather``); none is called at world size 1.
        compile: ``torch.compile`` keyword arguments for everything after the generator draw (``{}``: defaults,
            static shapes; ``{'mode': 'reduce-overhead'}`` captures it in a CUDA graph: one launch for the whole
            draw, whose returned tensors the next call overwrites: clone what you keep); ``None``: eager. The same
            selection either way.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> f = lambda: {'image_features': F.normalize(torch.randn(16, 8), dim=-1),
        ...              'text_features': F.normalize(torch.randn(16, 8), dim=-1),
        ...              'logit_scale': torch.tensor(10.), 'logit_bias': torch.tensor(-10.)}
        >>> sel = jest_select(f(), f(), 4, n_chunks=2, generator=torch.Generator().manual_seed(0))
        >>> sel.indices.shape, sorted(sel.stats)
        (torch.Size([4]), ['learnability_selected', 'learnability_superbatch'])
    """
    if selection not in SELECTION_METHODS:
        raise ValueError(f'selection must be one of {SELECTION_METHODS}, got {selection!r}')
    joint = selection == 'joint'
    track = learner is not None and reference is not None
    if learner is None and reference is None:
        raise ValueError('need learner or reference features (the super-batch size is taken from them)')
    anchor = (learner or reference)['image_features']
    validate_sizes(anchor.shape[0], n_select, n_chunks, 1)
    validate_temperature(temperature)
    objective = build_objective(loss)
    queued = any(f is not None and QUEUE_KEYS[1] in f for f in (learner, reference))
    check_scope(objective, world_size, masked=mask is not None or queued)
    Comm(rank, world_size, all_gather)  # the argument checks, before the generator is drawn from
    # the one host-side step (a value from the CPU generator); the rest is tensor work a compiler can take whole
    noise = selection_noise(generator, rank, n_select, n_chunks, joint, anchor.shape[0], anchor.device)
    core = _select if compile is None else _compiled_select(compile)
    indices, global_indices, stats = core(learner, reference, n_select, noise, objective=objective, score=score,
                                          joint=joint, track=track, dense=not objective.blockwise or mask is not None
                                          or queued, n_chunks=n_chunks, temperature=temperature, rank=rank,
                                          world_size=world_size, all_gather=all_gather, mask=mask)
    return Selection(indices, global_indices, stats)


def _select(learner: Optional[Features], reference: Optional[Features], n_select: int, noise: torch.Tensor, *,
            objective: Objective, score: str, joint: bool, track: bool, dense: bool, n_chunks: int,
            temperature: float, rank: int, world_size: int, all_gather: Optional[AllGather],
            mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`jest_select` after its checks and its draw from the generator: no host work, no host sync (at world
    size 1 dynamo traces it as one graph), so ``compile`` can capture it whole."""
    if dense:
        scorer = DenseBlocks(objective, {'learner': learner, 'reference': reference}, score, track, joint,
                              n_select, mask)
    else:
        scorer = conditional_scorer(learner, reference, score=score, loss=objective, joint=joint,
                                    quota=n_select, rank=rank, world_size=world_size, all_gather=all_gather,
                                    track=track)
    sizes = chunk_sizes(n_select, n_chunks if joint else 1)
    picks = blockwise_draw(scorer, sizes, noise, temperature, joint, add_all=track)
    partials = scorer.stat_partials() if track else torch.zeros(0, device=picks.device)
    # One collective for everyone's picks and statistics; float64 holds indices exactly (< 2**53).
    rows = torch.stack(scorer.comm.gather(torch.cat([picks.double(), partials.double()])))
    n, world = scorer.num_items, scorer.comm.world_size
    everyone = rows[:, :n_select].long() + torch.arange(world, device=rows.device)[:, None] * n
    global_indices = torch.cat([part.flatten() for part in everyone.split(sizes, dim=1)])
    stats = scorer.finalize(rows[:, n_select:].sum(0), n * world, n_select * world) if track else {}
    return picks, global_indices, stats


_COMPILED: dict[str, Callable] = {}


def _compiled_select(options: dict) -> Callable:
    """``torch.compile(_select, **options)``, built once per distinct options; static shapes unless asked
    (``dynamic=False``: a new super-batch size or temperature is a new specialised graph, not a symbolic one the
    chunk arithmetic cannot trace)."""
    key = repr(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_select, **{'dynamic': False, **options})
    return _COMPILED[key]


def selection_flops(loss: str, n: int, b: int, dim: int, *, n_chunks: int = 16, world_size: int = 1,
                    models: int = 2) -> float:
    """Matmul FLOPs (2 per multiply-add) of one rank's :func:`jest_select` (joint, statistics included).

    Every chunk costs ``l_kj`` and ``l_jk`` of the ``n`` local rows against its ``c_g`` gathered items,
    ``4 n b_g d`` per model in all; softmax adds the as-a-negative terms against the whole chosen set
    before each later chunk and its ``b``-block statistic; sigmoid its ``STAT_BLOCK`` statistic.

    Example:
        >>> round(selection_flops('sigmoid', 2560, 512, 768, world_size=64) / 1e9)  # GFLOP, one rank of 64
        517
    """
    b_g = b * world_size
    flops = 4 * n * b_g * dim
    if loss == 'softmax':
        sizes = chunk_sizes(b, n_chunks)
        chosen = [world_size * sum(sizes[:t + 1]) for t in range(len(sizes) - 1)]
        flops += 4 * n * sum(chosen) * dim + 2 * n * b * dim
    else:
        flops += 2 * n * min(STAT_BLOCK, n) * dim
    return float(models * flops)
