"""The matrix-free conditional scorers behind :func:`composer_jest.core.scoring.jest_select`, one class per loss family.

Each scorer holds one rank's ``N`` candidates (:class:`ScaledFeatures` per model) and answers the
:class:`~composer_jest.core.selection.BlockScorer` protocol: ``initial()`` conditional scores, then ``add(new)``
after each chunk, gathering only the chunk just chosen (:class:`Comm`); temporaries never exceed
:data:`BLOCK_ELEMENTS`. The math of each (sigmoid pair sums, softmax running normalisers, an anchor objective's
statistic of its negatives) and the statistics' estimators are in :mod:`composer_jest.core.scoring`'s docstring.

* :class:`SigmoidBlocks`: ``c_k += sum_{j in D} (S_kj + S_jk)`` over each new chunk ``D``.
* :class:`SoftmaxBlocks`, :class:`AnchorBlocks` (any :mod:`~composer_jest.core.objectives` anchor objective):
  per-item statistics against the chosen set, kept in a buffer of the chosen embeddings (:class:`ChosenSetBlocks`).
* :class:`DenseBlocks`: ``N x N`` logits at one rank, for false negatives or a negatives queue.

Pure torch, no Composer import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from composer_jest.core.batch import Features
from composer_jest.core.objectives import Objective
from composer_jest.core.selection import SCORE_METHODS, SCORE_TERMS

__all__ = ['BLOCK_ELEMENTS', 'STAT_BLOCK', 'STAT_TERMS', 'AllGather', 'Comm', 'ScaledFeatures', 'Blockwise',
           'SigmoidBlocks', 'ChosenSetBlocks', 'SoftmaxBlocks', 'AnchorBlocks', 'DenseBlocks']

# Largest temporary (elements) of one block product: 2**24 float32 = 64 MiB.
BLOCK_ELEMENTS = 1 << 24
# Block size of the sigmoid uniform-batch estimate (pairs inside consecutive local blocks).
STAT_BLOCK = 256
STAT_TERMS = SCORE_TERMS['learnability']  # the logged statistic is learnability

AllGather = Callable[[torch.Tensor], Sequence[torch.Tensor]]
"""``all_gather(t)``: the equally shaped ``t`` of every rank, indexed by rank (``composer.utils.dist.all_gather``)."""


class Comm:
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
class ScaledFeatures:
    """One model's local features, float32, images pre-scaled by ``t`` (as in ``sigmoid_pair_loss``)."""

    xs: torch.Tensor  # t x_k, [N, d]
    y: torch.Tensor  # y_k, [N, d]
    bias: Optional[torch.Tensor]  # b, shape [1, 1] (sigmoid) or None (softmax: no bias)
    diag: torch.Tensor  # l_kk = t x_k·y_k (+ b)

    @classmethod
    def build(cls, features: Features, name: str, loss: str) -> ScaledFeatures:
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


class Blockwise:
    """Shared state of the two loss scorers: models, score/stat weights, the chosen local items."""

    def __init__(self, models: dict[str, ScaledFeatures], score: str, track: bool, comm: Comm, n: int,
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

    def _split(self, block: torch.Tensor) -> Iterator[tuple[str, ScaledFeatures, torch.Tensor, torch.Tensor]]:
        start = 0
        for name, m in self.models.items():
            d = m.dim
            yield name, m, block[:, start:start + d], block[:, start + d:start + 2 * d]
            start += 2 * d


class SigmoidBlocks(Blockwise):
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


class ChosenSetBlocks(Blockwise):
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


class SoftmaxBlocks(ChosenSetBlocks):
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


class AnchorBlocks(ChosenSetBlocks):
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

    def _negatives(self, m: ScaledFeatures, direction: str, rows, xs_d: torch.Tensor,
                   y_d: torch.Tensor) -> torch.Tensor:
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

    finalize = SoftmaxBlocks.finalize


class DenseBlocks:
    """One rank's exact scores for any objective (false negatives included) from ``N x N`` logit matrices.

    The path of the objectives the matrix-free scorers do not cover (``world_size = 1`` only): the
    objective's own conditional scorer (:class:`~composer_jest.core.objectives.AnchorScorer` or the pair matrix),
    ``objective.per_example`` for independent selection. Statistics: the selected set's ``L(B) / b``
    exactly; the uniform-batch figure is the mean of ``L(block) / b`` over consecutive ``b``-blocks.
    """

    def __init__(self, objective: Objective, given: dict[str, Optional[Features]], score: str, track: bool,
                 joint: bool, quota: int, mask: Optional[torch.Tensor]):
        self.objective, self.mask, self.quota = objective, mask, quota
        self.comm = Comm(0, 1, None)
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
