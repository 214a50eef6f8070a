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
  normaliser (``_AnchorBlocks``). With false negatives or a negatives queue every objective is scored from
  ``N x N`` logits at one rank (``_DenseBlocks``; ``scope='global'`` fails early, :func:`check_scope`).

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

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, TypedDict

import torch
import torch.nn.functional as F

from composer_jest.core.objectives import QUEUE_KEYS, Objective, build_objective, loss_names
from composer_jest.core.selection import (
    SCORE_METHODS,
    SCORE_TERMS,
    SELECTION_METHODS,
    _validate_sizes,
    _validate_temperature,
    blockwise_draw,
    chunk_sizes,
    selection_noise,
)

__all__ = ['Features', 'AllGather', 'Selection', 'BLOCK_ELEMENTS', 'STAT_BLOCK', 'conditional_scorer', 'jest_select',
           'selection_flops', 'check_settings', 'check_scope', 'all_finite', 'check_finite']

# Largest temporary (elements) of one block product: 2**24 float32 = 64 MiB.
BLOCK_ELEMENTS = 1 << 24
# Block size of the sigmoid uniform-batch estimate (pairs inside consecutive local blocks).
STAT_BLOCK = 256
STAT_TERMS = SCORE_TERMS['learnability']  # the logged statistic is learnability

AllGather = Callable[[torch.Tensor], Sequence[torch.Tensor]]
"""``all_gather(t)``: the equally shaped ``t`` of every rank, indexed by rank (``composer.utils.dist.all_gather``)."""


class Features(TypedDict):
    """One model's view of the super-batch (what a CLIP forward returns)."""

    image_features: torch.Tensor  # [N, d], L2-normalised
    text_features: torch.Tensor  # [N, d], L2-normalised
    logit_scale: torch.Tensor | float  # the scale t itself (not its log)
    logit_bias: Optional[torch.Tensor | float]  # b (sigmoid loss only)


class Selection(NamedTuple):
    """What :func:`jest_select` returns."""

    indices: torch.Tensor  # this rank's picks: positions in its own super-batch, in draw order
    global_indices: torch.Tensor  # every rank's picks as rank * N + position, per chunk rank by rank
    stats: dict[str, torch.Tensor]  # learnability_superbatch / learnability_selected (0-dim tensors)


class _Comm:
    def __init__(self, rank: int, world_size: int, all_gather: Optional[AllGather]):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f'need ints 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}')
        if world_size > 1 and all_gather is None:
            raise ValueError(f'world_size={world_size} needs an all_gather callable '
                             '(e.g. composer.utils.dist.all_gather)')
        self.rank, self.world_size, self._all_gather = rank, world_size, all_gather

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``; no collective at world size 1."""
        if self.world_size == 1:
            return [tensor]
        return list(self._all_gather(tensor.contiguous()))


@dataclass
class _Model:
    """One model's local features, float32, images pre-scaled by ``t`` (as in ``sigmoid_pair_loss``)."""

    xs: torch.Tensor  # t x_k, [N, d]
    y: torch.Tensor  # y_k, [N, d]
    bias: Optional[torch.Tensor]  # b, shape [1, 1] (sigmoid) or None (softmax: no bias)
    diag: torch.Tensor  # l_kk = t x_k·y_k (+ b)

    @classmethod
    def build(cls, features: Features, name: str, loss: str) -> _Model:
        image, text = features['image_features'], features['text_features']
        if image.dim() != 2 or image.shape != text.shape:
            raise ValueError(f'{name} image_features and text_features must both be [N, d], got '
                             f'{tuple(image.shape)} and {tuple(text.shape)}')
        scale = torch.as_tensor(features['logit_scale'], device=image.device).float().reshape(())
        xs, y = image.float() * scale, text.float()
        bias = None
        if loss == 'sigmoid':
            if features.get('logit_bias') is None:
                raise ValueError(f'the sigmoid loss needs {name} logit_bias: create the model with init_logit_bias')
            bias = torch.as_tensor(features['logit_bias'], device=image.device).float().reshape(1, 1)
        diag = (xs * y).sum(1) + (bias.reshape(()) if bias is not None else 0.0)
        return cls(xs, y, bias, diag)

    @property
    def dim(self) -> int:
        return self.xs.shape[1]

    def logits(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``left @ right.T (+ b)``: ``l_kj`` for ``(xs_k, y_j)`` rows, ``l_jk`` for ``(y_k, xs_j)``."""
        if self.bias is None:
            return left @ right.T
        return torch.addmm(self.bias, left, right.T)


def _weighted(weights: dict[str, float], per_model: dict[str, torch.Tensor], start: torch.Tensor) -> torch.Tensor:
    """``start + sum_m w_m per_model[m]``."""
    for name, w in weights.items():
        start = start + w * per_model[name]
    return start


def _row_blocks(pieces: Sequence[torch.Tensor], max_rows: int) -> Iterator[torch.Tensor]:
    """The rows of ``pieces`` (e.g. per-rank chunks) in blocks of at most ``max_rows``, without one big cat."""
    pending, count = [], 0
    for piece in pieces:
        for part in piece.split(max_rows):
            if count + part.shape[0] > max_rows and pending:
                yield torch.cat(pending)
                pending, count = [], 0
            pending.append(part)
            count += part.shape[0]
    if pending:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]


class _Blockwise:
    """Shared state of the two loss scorers: models, score/stat weights, the chosen local items."""

    def __init__(self, models: dict[str, _Model], score: str, track: bool, comm: _Comm, n: int,
                 device: torch.device):
        self.models, self.comm, self.num_items, self.device = models, comm, n, device
        self.score_w = dict(SCORE_TERMS[score])
        self.stat_w = dict(STAT_TERMS) if track else {}
        self.chosen = torch.empty(0, dtype=torch.long, device=device)  # local, in draw order
        self.max_rows = max(1, BLOCK_ELEMENTS // max(n, 1))
        self.piece = max(1, self.max_rows // comm.world_size)  # local rows per gather when need_cond=False

    def _payload(self, new: torch.Tensor) -> torch.Tensor:
        # [c, 2 d M]: scaled images and texts of the new local picks, model by model
        return torch.cat([t for m in self.models.values() for t in (m.xs[new], m.y[new])], 1)

    def _split(self, block: torch.Tensor) -> Iterator[tuple[str, _Model, torch.Tensor, torch.Tensor]]:
        start = 0
        for name, m in self.models.items():
            d = m.dim
            yield name, m, block[:, start:start + d], block[:, start + d:start + 2 * d]
            start += 2 * d


class _SigmoidBlocks(_Blockwise):
    """Conditional sigmoid-loss scores of the local candidates, updated chunk by chunk."""

    def __init__(self, *args):
        super().__init__(*args)
        # S_kk = sum_m w_m softplus(-l_kk)  (z_kk = +1)
        self.cond = _weighted(self.score_w, {k: F.softplus(-m.diag) for k, m in self.models.items()},
                              torch.zeros(self.num_items, device=self.device))
        self.selected = torch.zeros((), device=self.device)  # sum over pairs of the selected set (local rows)

    def initial(self) -> torch.Tensor:
        return self.cond

    def add(self, new: torch.Tensor, need_cond: bool) -> Optional[torch.Tensor]:
        if not self.models:  # uniform: nothing to learn from the others' choices
            self.chosen = torch.cat([self.chosen, new])
            return self.cond
        if not need_cond:  # statistics only: the chosen rows, the new set gathered in bounded pieces
            for piece in new.split(self.piece):
                self._add(piece, rows_all=False)
            return None
        self._add(new, rows_all=True)
        return self.cond

    def _add(self, new: torch.Tensor, rows_all: bool) -> None:
        previous = self.chosen
        self.chosen = torch.cat([previous, new])
        need_cond = rows_all
        gathered = self.comm.gather(self._payload(new))
        rows = None if rows_all else self.chosen  # the statistic needs only the chosen rows
        row_sum = {k: 0.0 for k in self.models}  # sum_{j in D} S^m_kj  (k's image, D's texts)
        col_sum = {k: 0.0 for k in self.models}  # sum_{j in D} S^m_jk  (D's images, k's text)
        for block in _row_blocks(gathered, self.max_rows):
            for name, m, xs_d, y_d in self._split(block):
                xs, y = (m.xs, m.y) if rows is None else (m.xs[rows], m.y[rows])
                row_sum[name] = row_sum[name] + F.softplus(m.logits(xs, y_d)).sum(1)  # z = -1 off the diagonal
                col_sum[name] = col_sum[name] + F.softplus(m.logits(y, xs_d)).sum(1)
        if self.stat_w:
            self._add_selected(previous, new, row_sum, col_sum, rows is None)
        if need_cond:
            self.cond = _weighted(self.score_w, {k: row_sum[k] + col_sum[k] for k in self.models}, self.cond)

    def _add_selected(self, previous, new, row_sum, col_sum, all_rows: bool) -> None:
        # s(B) = sum over chunks t of: pairs (earlier i, j in D_t) both ways + ordered pairs inside D_t.
        # Rank-local rows: earlier chosen i get row + col sums, new i get the row sum with (i, i) made diagonal.
        prev_pos = previous if all_rows else torch.arange(previous.numel(), device=self.device)
        new_pos = new if all_rows else torch.arange(previous.numel(), self.chosen.numel(), device=self.device)
        for name, w in self.stat_w.items():
            m = self.models[name]
            earlier = (row_sum[name][prev_pos] + col_sum[name][prev_pos]).sum()
            # softplus(-l) - softplus(l) = -l: swap the off-diagonal term of (i, i) for the diagonal one
            inside = (row_sum[name][new_pos] - m.diag[new]).sum()
            self.selected = self.selected + w * (earlier + inside)

    def stat_partials(self) -> torch.Tensor:
        """``[s(B) rows of this rank, sum_k S_kk, off-diagonal sum, off-diagonal count]`` (learnability)."""
        zero = torch.zeros((), device=self.device)
        diag = _weighted(self.stat_w, {k: F.softplus(-m.diag).sum() for k, m in self.models.items()}, zero)
        off, count = zero, 0
        for block in torch.arange(self.num_items, device=self.device).split(STAT_BLOCK):
            for name, w in self.stat_w.items():
                m = self.models[name]
                # every pair of the block as a negative, less the (i, i) entries
                pairs = F.softplus(m.logits(m.xs[block], m.y[block])).sum() - F.softplus(m.diag[block]).sum()
                off = off + w * pairs
            count += block.numel() * (block.numel() - 1)
        return torch.stack([self.selected, diag, off, torch.full((), float(count), device=self.device)])  # no H2D copy

    @staticmethod
    def finalize(totals: torch.Tensor, n_global: int, b_global: int) -> dict[str, torch.Tensor]:
        selected, diag, off, count = totals
        uniform = diag / n_global + (b_global - 1) * off / count.clamp(min=1)
        return {'learnability_superbatch': uniform.float(), 'learnability_selected': (selected / b_global).float()}


class _ChosenSetBlocks(_Blockwise):
    """Shared chunk loop of the scorers whose per-item statistics absorb every chosen item (softmax, anchor).

    Subclasses call :meth:`_init_chosen_set` last in ``__init__`` and define ``_absorb(blocks, rows)`` (the
    statistics of local ``rows`` absorb gathered items), ``_per_example()`` and ``_conditional()``.
    """

    def _init_chosen_set(self, joint: bool, quota: int, width: int) -> None:
        # chosen set's embeddings, [chunk rows, rank, width]: row-major flattening = the statistics' order
        self.buffer = torch.empty(quota if joint else 0, self.comm.world_size, width, device=self.device)
        self.filled = 0
        self.cond = torch.zeros(self.num_items, device=self.device) if joint else self._per_example()

    def initial(self) -> torch.Tensor:
        return self.cond

    def add(self, new: torch.Tensor, need_cond: bool) -> Optional[torch.Tensor]:
        self.chosen = torch.cat([self.chosen, new])
        if not self.models:
            return self.cond
        if not need_cond:  # statistics only: the chosen rows (all of them: every row must see every piece)
            for piece in new.split(self.piece):  # absorb the new picks, gathered in bounded pieces
                self._absorb(_row_blocks(self.comm.gather(self._payload(piece)), self.max_rows), self.chosen)
            return None
        gathered = self.comm.gather(self._payload(new))
        c = new.numel()
        for r, piece in enumerate(gathered):  # kept for the as-a-negative terms of later chunks
            self.buffer[self.filled:self.filled + c, r] = piece
        self._absorb(self.buffer[self.filled:self.filled + c].flatten(0, 1).split(self.max_rows), slice(None))
        self.filled += c
        self.cond = self._conditional()
        return self.cond


class _SoftmaxBlocks(_ChosenSetBlocks):
    """Exact conditional softmax-loss scores of the local candidates (see the module docstring)."""

    def __init__(self, models, score, track, comm, n, device, joint: bool, quota: int, sub_batch: int):
        super().__init__(models, score, track, comm, n, device)
        self.sub_batch = sub_batch
        inf = torch.full((n,), -float('inf'), device=device)
        self.row_lse = {k: inf.clone() for k in models}  # a_k = LSE_{j in C} l_kj
        self.col_lse = {k: inf.clone() for k in models}  # a'_k = LSE_{j in C} l_jk
        self._init_chosen_set(joint, quota, sum(2 * m.dim for m in models.values()))

    def _per_example(self) -> torch.Tensor:
        """``sum_m w_m ½ [LSE_j l_kj + LSE_j l_jk - 2 l_kk]`` over the local super-batch, in row blocks."""
        total = torch.zeros(self.num_items, device=self.device)
        for name, w in self.score_w.items():
            m = self.models[name]
            row = torch.empty(self.num_items, device=self.device)
            col = torch.full((self.num_items,), -float('inf'), device=self.device)
            for block in torch.arange(self.num_items, device=self.device).split(self.max_rows):
                logits = m.logits(m.xs[block], m.y)
                row[block] = logits.logsumexp(1)
                col = torch.logaddexp(col, logits.logsumexp(0))
            total = total + w * 0.5 * (row + col - 2 * m.diag)
        return total

    def _absorb(self, blocks, rows) -> None:
        """``a_k``, ``a'_k`` of ``rows`` absorb the gathered new items: log-add-exp of their logits."""
        for block in blocks:
            for name, m, xs_d, y_d in self._split(block):
                self.row_lse[name][rows] = torch.logaddexp(self.row_lse[name][rows],
                                                           m.logits(m.xs[rows], y_d).logsumexp(1))
                self.col_lse[name][rows] = torch.logaddexp(self.col_lse[name][rows],
                                                           m.logits(m.y[rows], xs_d).logsumexp(1))

    def _conditional(self) -> torch.Tensor:
        # R_i, K_i of every chosen item, in the buffer's row order: [chunk rows, rank, 2 models]
        local = torch.stack([t[self.chosen] for k in self.models for t in (self.row_lse[k], self.col_lse[k])], 1)
        norms = torch.stack(self.comm.gather(local), 1).flatten(0, 1)
        chosen_rows = self.buffer[:self.filled].flatten(0, 1)
        total = torch.zeros(self.num_items, device=self.device)
        for i, (name, m) in enumerate(self.models.items()):
            w = self.score_w.get(name)
            if w is None:  # a statistics-only model
                continue
            own = 0.5 * (torch.logaddexp(self.row_lse[name], m.diag) + torch.logaddexp(self.col_lse[name], m.diag)
                         - 2 * m.diag)
            negative = torch.zeros(self.num_items, device=self.device)
            start = sum(2 * mm.dim for mm in list(self.models.values())[:i])
            for block, norm in zip(chosen_rows.split(self.max_rows), norms.split(self.max_rows)):
                xs_c, y_c = block[:, start:start + m.dim], block[:, start + m.dim:start + 2 * m.dim]
                negative += F.softplus(m.logits(m.y, xs_c) - norm[:, 2 * i]).sum(1)  # l_ik - R_i
                negative += F.softplus(m.logits(m.xs, y_c) - norm[:, 2 * i + 1]).sum(1)  # l_ki - K_i
            total = total + w * (own + 0.5 * negative)
        return total

    def stat_partials(self) -> torch.Tensor:
        """``[L(B) rows of this rank, sum of L(block) over local b-blocks, number of blocks]`` (learnability)."""
        selected = torch.zeros((), device=self.device)
        uniform = torch.zeros((), device=self.device)
        n_blocks = self.num_items // self.sub_batch
        blocks = torch.arange(n_blocks * self.sub_batch, device=self.device).view(n_blocks, self.sub_batch)
        for name, w in self.stat_w.items():
            m = self.models[name]
            c = self.chosen
            # after the last chunk, a_i = R_i and a'_i = K_i over the whole selected set
            selected = selected + w * 0.5 * (self.row_lse[name][c] + self.col_lse[name][c] - 2 * m.diag[c]).sum()
            for block in blocks:
                logits = m.logits(m.xs[block], m.y[block])
                uniform = uniform + w * 0.5 * (logits.logsumexp(1) + logits.logsumexp(0)
                                               - 2 * torch.diagonal(logits)).sum()
        return torch.stack([selected, uniform, torch.full((), float(n_blocks), device=self.device)])

    def finalize(self, totals: torch.Tensor, n_global: int, b_global: int) -> dict[str, torch.Tensor]:
        selected, uniform, n_blocks = totals
        return {'learnability_superbatch': (uniform / (n_blocks.clamp(min=1) * self.sub_batch)).float(),
                'learnability_selected': (selected / b_global).float()}


class _AnchorBlocks(_ChosenSetBlocks):
    """Exact conditional scores of any anchor objective (:mod:`composer_jest.core.objectives`), matrix-free.

    The softmax scorer's scheme with the objective's statistic in place of the log-normaliser: every local
    item keeps, per model and direction, the statistic ``s_k`` of its negatives in the chosen set ``C``
    (``combine`` absorbs each gathered chunk; an item never counts itself: the payload carries global ids).
    ``k``'s own terms are ``g(s_k, l_kk)``; as a new negative of every chosen ``i`` (their statistics
    all-gathered each chunk, their positives recomputed from the kept embeddings) it adds
    ``g(merge(s_i, l_ik)) - g(s_i)``. Costs as the softmax scorer's.
    """

    def __init__(self, models, score, track, comm, n, device, joint: bool, quota: int, objective,
                 scales: dict[str, torch.Tensor]):
        super().__init__(models, score, track, comm, n, device)
        self.objective, self.scales, self.sub_batch = objective, scales, quota
        self.gid = (torch.arange(n, device=device) + comm.rank * n).float()  # exact below 2**24 items
        if n * comm.world_size >= 1 << 24:
            raise ValueError('the anchor scorer numbers items in float32: N x world_size must be < 2**24')
        self.stats = {k: {d: objective.empty(n, device) for d in objective.directions} for k in models}
        self._init_chosen_set(joint, quota, sum(2 * m.dim for m in models.values()) + 1)  # + the global id

    def _payload(self, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([super()._payload(new), self.gid[new, None]], 1)

    def _negatives(self, m: _Model, direction: str, rows, xs_d: torch.Tensor, y_d: torch.Tensor) -> torch.Tensor:
        """``l`` of anchors ``rows`` (local) against the gathered items: ``l_kj`` (image) or ``l_jk`` (text)."""
        return m.logits(m.xs[rows], y_d) if direction == 'image' else m.logits(m.y[rows], xs_d)

    def _per_example(self) -> torch.Tensor:
        """``sum_m w_m g(s_k over the local super-batch)``: independent selection, in row blocks."""
        obj, total = self.objective, torch.zeros(self.num_items, device=self.device)
        every = torch.arange(self.num_items, device=self.device)
        for name, w in self.score_w.items():
            m = self.models[name]
            for block in every.split(self.max_rows):
                valid = every[None, :] != block[:, None]
                for d in obj.directions:
                    stat = obj.reduce(self._negatives(m, d, block, m.xs, m.y), valid, m.diag[block])
                    total[block] += w * obj._weight * obj.value(stat, m.diag[block], self.scales[name])
        return total

    def _absorb(self, blocks, rows) -> None:
        """The statistics of ``rows`` absorb the gathered items (each row skipping itself)."""
        obj = self.objective
        for block in blocks:
            valid = block[None, :, -1] != self.gid[rows][:, None]
            for name, m, xs_d, y_d in self._split(block):
                for d in obj.directions:
                    part = obj.reduce(self._negatives(m, d, rows, xs_d, y_d), valid, m.diag[rows])
                    merged = obj.combine(tuple(s[rows] for s in self.stats[name][d]), part)
                    for s, v in zip(self.stats[name][d], merged):
                        s[rows] = v

    def _conditional(self) -> torch.Tensor:
        obj = self.objective
        keys = [(k, d) for k in self.models for d in obj.directions]
        # the chosen items' statistics, in the buffer's row order: [chunk rows, rank, statistics]
        local = torch.stack([t[self.chosen] for k, d in keys for t in self.stats[k][d]], 1)
        stats = torch.stack(self.comm.gather(local), 1).flatten(0, 1)
        chosen_rows = self.buffer[:self.filled].flatten(0, 1)
        width = len(obj.empty(0, self.device))
        total = torch.zeros(self.num_items, device=self.device)
        start = 0
        for name, m in self.models.items():
            w = self.score_w.get(name)
            if w is not None:
                total = total + w * self._model_gain(name, m, chosen_rows, stats, start, keys, width)
            start += 2 * m.dim
        return total

    def _model_gain(self, name, m, chosen_rows, stats, start, keys, width) -> torch.Tensor:
        obj, scale = self.objective, self.scales[name]
        gain = torch.zeros(self.num_items, device=self.device)
        for d in obj.directions:
            gain = gain + obj._weight * obj.value(self.stats[name][d], m.diag, scale)  # k's own terms
        for block, stat in zip(chosen_rows.split(self.max_rows), stats.split(self.max_rows)):
            xs_c, y_c = block[:, start:start + m.dim], block[:, start + m.dim:start + 2 * m.dim]
            pos = ((xs_c * y_c).sum(1) + (m.bias.reshape(()) if m.bias is not None else 0.0))[:, None]
            for d in obj.directions:
                col = keys.index((name, d)) * width
                s_i = tuple(stat[:, col + j, None] for j in range(width))
                # l_ik: chosen anchor i against candidate k (its text for image anchors, its image for text ones)
                l_ik = m.logits(xs_c, m.y) if d == 'image' else m.logits(y_c, m.xs)
                change = obj.value(obj.merge(s_i, l_ik, pos), pos, scale) - obj.value(s_i, pos, scale)
                gain = gain + obj._weight * change.sum(0)
        return gain

    def stat_partials(self) -> torch.Tensor:
        """``[L(B) rows of this rank, sum of L(block) over local b-blocks, number of blocks]`` (learnability)."""
        obj = self.objective
        selected = torch.zeros((), device=self.device)
        uniform = torch.zeros((), device=self.device)
        n_blocks = self.num_items // self.sub_batch
        blocks = torch.arange(n_blocks * self.sub_batch, device=self.device).view(n_blocks, self.sub_batch)
        for name, w in self.stat_w.items():
            m, c, scale = self.models[name], self.chosen, self.scales[name]
            for d in obj.directions:  # after the last chunk every chosen item's statistic covers B \ {i}
                stat = tuple(s[c] for s in self.stats[name][d])
                selected = selected + w * obj._weight * obj.value(stat, m.diag[c], scale).sum()
            for block in blocks:
                uniform = uniform + w * obj.set_loss(m.logits(m.xs[block], m.y[block]), scale=scale)
        return torch.stack([selected, uniform, torch.full((), float(n_blocks), device=self.device)])

    finalize = _SoftmaxBlocks.finalize


class _DenseBlocks:
    """One rank's exact scores for any objective (false negatives included) from ``N x N`` logit matrices.

    The path of the objectives the matrix-free scorers do not cover (``world_size = 1`` only): the
    objective's own conditional scorer (:class:`~composer_jest.core.objectives.AnchorScorer` or the pair matrix),
    ``objective.per_example`` for independent selection. Statistics: the selected set's ``L(B) / b``
    exactly; the uniform-batch figure is the mean of ``L(block) / b`` over consecutive ``b``-blocks.
    """

    def __init__(self, objective: Objective, given: dict[str, Optional[Features]], score: str, track: bool,
                 joint: bool, quota: int, mask: Optional[torch.Tensor]):
        self.objective, self.mask, self.quota = objective, mask, quota
        self.comm = _Comm(0, 1, None)
        if score not in SCORE_METHODS:
            raise ValueError(f'score must be one of {SCORE_METHODS}, got {score!r}')
        needed = {name for name, _ in SCORE_TERMS[score]} | ({name for name, _ in STAT_TERMS} if track else set())
        for name in sorted(needed):
            if given[name] is None:
                raise ValueError(f'score={score!r} needs {name} features')
        self.models = {name: (objective.logits(given[name]), objective.scale(given[name]),
                              objective.queue_logits(given[name]))  # the model's negatives queue, if it has one
                       for name in ('learner', 'reference') if name in needed}
        sizes = {name: lg.shape[0] for name, (lg, _, _) in self.models.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f'learner and reference features must cover the same super-batch, got sizes {sizes}')
        anchor = (given['learner'] or given['reference'])['image_features']
        self.num_items, self.device = anchor.shape[0], anchor.device
        terms = [(*self.models[name], w) for name, w in SCORE_TERMS[score]]
        self.stat_terms = [(*self.models[name], w) for name, w in STAT_TERMS] if track else []
        self.chosen = torch.empty(0, dtype=torch.long, device=self.device)
        self.scorer = None
        if not terms:
            self.cond = torch.zeros(self.num_items, device=self.device)
        elif joint:
            self.scorer = objective.scorer([(lg, w, scale, queue) for lg, scale, queue, w in terms], mask)
            self.cond = self.scorer.initial()
        else:
            self.cond = sum(w * objective.per_example(lg, mask, scale, queue) for lg, scale, queue, w in terms)

    def initial(self) -> torch.Tensor:
        return self.cond

    def add(self, new: torch.Tensor, need_cond: bool) -> Optional[torch.Tensor]:
        self.chosen = torch.cat([self.chosen, new])
        if not need_cond:
            return None
        if self.scorer is not None:
            self.cond = self.scorer.add(new)
        return self.cond

    def _value(self, indices: torch.Tensor) -> torch.Tensor:
        return sum(w * self.objective.set_loss(lg, indices, self.mask, scale, queue)
                   for lg, scale, queue, w in self.stat_terms)

    def stat_partials(self) -> torch.Tensor:
        """``[L(B), sum of L(block) over the local b-blocks, number of blocks]`` (learnability)."""
        n_blocks = self.num_items // self.quota
        blocks = torch.arange(n_blocks * self.quota, device=self.device).view(n_blocks, self.quota)
        uniform = sum((self._value(block) for block in blocks), torch.zeros((), device=self.device))
        return torch.stack([self._value(self.chosen), uniform, torch.full((), float(n_blocks), device=self.device)])

    def finalize(self, totals: torch.Tensor, n_global: int, b_global: int) -> dict[str, torch.Tensor]:
        selected, uniform, n_blocks = totals
        return {'learnability_superbatch': (uniform / (n_blocks.clamp(min=1) * self.quota)).float(),
                'learnability_selected': (selected / b_global).float()}


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
) -> _SigmoidBlocks | _SoftmaxBlocks | _AnchorBlocks:
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
    comm = _Comm(rank, world_size, all_gather)
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
    models = {name: _Model.build(given[name], name, objective.name) for name in needed}
    sizes = {name: m.xs.shape[0] for name, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f'learner and reference features must cover the same super-batch, got sizes {sizes}')
    args = (models, score, track, comm, anchor.shape[0], anchor.device)
    if objective.name == 'sigmoid':
        return _SigmoidBlocks(*args)
    if objective.name == 'softmax':
        return _SoftmaxBlocks(*args, joint=joint, quota=quota, sub_batch=quota)
    scales = {name: objective.scale(given[name]) for name in needed}
    return _AnchorBlocks(*args, joint=joint, quota=quota, objective=objective, scales=scales)


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
    _validate_sizes(anchor.shape[0], n_select, n_chunks, 1)
    _validate_temperature(temperature)
    objective = build_objective(loss)
    queued = any(f is not None and QUEUE_KEYS[1] in f for f in (learner, reference))
    check_scope(objective, world_size, masked=mask is not None or queued)
    _Comm(rank, world_size, all_gather)  # the argument checks, before the generator is drawn from
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
        scorer = _DenseBlocks(objective, {'learner': learner, 'reference': reference}, score, track, joint,
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


def check_settings(*, filter_ratio: float, n_chunks: int, score: str, selection: str, loss: Optional[str],
                   temperature: float) -> None:
    """Raise ``ValueError`` naming the setting and its accepted values (``loss=None``: follow the model)."""
    if isinstance(filter_ratio, bool) or not (isinstance(filter_ratio, (int, float)) and 0.0 <= filter_ratio < 1.0):
        raise ValueError(f'filter_ratio must be a float in [0, 1), got {filter_ratio!r}')
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f'n_chunks must be an int >= 1, got {n_chunks!r}')
    for name, value, allowed in (('score', score, SCORE_METHODS), ('selection', selection, SELECTION_METHODS)):
        if value not in allowed:
            raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
    if loss is not None:
        build_objective(loss, 'loss')  # names the registered losses and their parameters
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f'temperature must be a finite float > 0, got {temperature!r}')


def all_finite(*features: Optional[Features]) -> torch.Tensor:
    """A device bool: no NaN/inf in any floating tensor of the given feature dicts (no host sync)."""
    flags = [torch.isfinite(v).all() for f in features if f is not None for v in f.values()
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else torch.tensor(True)


def check_finite(features: Optional[Features], source: str, step: int) -> None:
    """Raise :class:`FloatingPointError` naming ``source``, ``step`` and the keys if any tensor is NaN or inf."""
    if features is None:
        return
    bad = [k for k, v in features.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(
            f'non-finite values (NaN or inf) in {bad} from the {source} at step {step}: the scores cannot be '
            'computed. A learner that diverged needs a lower learning rate or gradient clipping; a reference or '
            'cached columns with NaN/inf need to be re-made (check the checkpoint / re-run embed-reference).',
        )
