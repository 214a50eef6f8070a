"""Contrastive objectives by name: the training loss and JEST's exact conditional score of each.

A *loss spec* is a registered name (``'softmax'``) or a dict ``{'name': 'hcl', 'beta': 1.0, ...}`` of its
parameters; :func:`build_objective` turns it into an :class:`Objective`. ``CLIPModel(loss=...)``, yaml
``model.loss`` and ``JEST(loss=...)`` all take a spec. Registered (``LOSS_REGISTRY``, a ``catalogue``
registry with entry points ``composer_jest_losses``):

* ``sigmoid`` (SigLIP): ``ℓ_ij = softplus(-z_ij l_ij)``, ``z_ii = 1``, ``z_ij = -1``. Pair-decomposable.
* ``softmax`` (InfoNCE / CLIP): per anchor ``log(e^{l_ii} + Σ_{j≠i} e^{l_ij}) - l_ii``, both directions.
* ``dcl`` (decoupled, Yeh et al. 2022): the positive removed from the denominator,
  ``LSE_{j≠i} l_ij - l_ii``.
* ``hcl`` (hard negatives, Robinson et al. 2021): with ``M`` negatives, ``β`` and the positive-class prior
  ``τ⁺``, ``N_g = max((M Σ_j e^{(1+β) l_ij} / Σ_j e^{β l_ij} - τ⁺ M e^{l_ii}) / (1 - τ⁺), M e^{-t})``
  and the anchor loss ``log(e^{l_ii} + N_g) - l_ii`` (``β = τ⁺ = 0`` is ``softmax``).
* ``triplet``: on cosine similarities ``s_ij`` (no scale), ``[m + s_ij* - s_ii]_+`` with ``j*`` the
  hardest in-batch negative (``mining='hardest'``) or the semi-hard one (``'semi-hard'``: the most similar
  negative less similar than the positive; if none, the least similar negative).
* ``npair`` (multi-class N-pair, Sohn 2016): image anchors only, ``log(1 + Σ_{j≠i} e^{l_ij - l_ii})``
  (with L2-normalised features the paper's norm regulariser is a constant and is dropped).

Logits are ``l_ij = t x_i·y_j (+ b)`` with ``t`` the model's learned scale, or ``1 / temperature`` when a
``temperature`` is given (``softmax``, ``dcl``, ``hcl``, ``npair``). Every objective's batch loss is
``L(B) = Σ_{i∈B} Σ_dir w_dir ℓ_i^dir(B)`` (``w = ½`` for two directions), the training loss is
``L(B) / |B|``, and a set of one has loss zero for every anchor objective (no negatives).

*False negatives* (``false_negatives: {key: label}`` or ``{threshold: 0.9, modality: image}`` inside a loss
spec): in-batch pairs ``(i, j)``, ``i ≠ j``, that share an id column or whose reference image–image /
text–text cosine similarity exceeds ``threshold`` are no negatives of each other: they leave every sum,
max and count above (sigmoid: the pair term is dropped). See :class:`FalseNegatives`.

*A negatives queue* (``negatives: {queue_size: K, momentum: m}`` in an anchor objective's spec): the model keeps a
momentum copy of its towers and their embeddings of the last ``K`` trained examples
(:class:`~composer_jest.models.negatives.NegativesQueue`); they join every anchor's negatives in the training loss
and in the learner's JEST scores (features with ``QUEUE_KEYS``; with a queue a singleton's loss is no longer zero).
Both live in :mod:`composer_jest.core.negatives`.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    >>> x[1] = x[0]  # 1 is a near copy of 0: a false negative of it, the largest term of 0's negatives
    >>> f = {'image_features': x, 'text_features': x, 'logit_scale': 10.0, 'logit_bias': -5.0}
    >>> dcl = build_objective({'name': 'dcl', 'false_negatives': {'key': 'label'}})
    >>> mask = dcl.false_negatives.mask(torch.tensor([0, 0, 1, 2, 3, 4]))  # 0 and 1 share a label
    >>> bool(dcl.training_loss(f, mask) < dcl.training_loss(f))  # a false negative no longer pushes 0 from 1
    True
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional

import catalogue
import torch
import torch.nn.functional as F

from composer_jest.core.batch import Features
from composer_jest.core.negatives import (  # noqa: F401  (FalseNegatives, Negatives: re-exported, part of the API)
    QUEUE_KEYS,
    FalseNegatives,
    Negatives,
    QueueLogits,
    false_negatives_spec,
    negative_pairs,
    negatives_spec,
)

__all__ = ['LOSS_REGISTRY', 'QUEUE_KEYS', 'QueueLogits', 'Objective', 'Sigmoid', 'Softmax', 'DCL',
           'HCL', 'Triplet', 'NPair', 'FalseNegatives', 'Negatives', 'AnchorScorer', 'build_objective', 'loss_names']

LOSS_REGISTRY = catalogue.create('composer_jest', 'losses', entry_points=True)
_NEG_INF = -math.inf


def loss_names() -> list[str]:
    """Registered loss names, entry points included."""
    return sorted(LOSS_REGISTRY.get_all())


def _term(term: Sequence) -> tuple:
    """``(logits, weight, scale, queue)`` from a 3- or 4-tuple term."""
    logits, w, scale = term[:3]
    return logits.float(), float(w), scale, (term[3] if len(term) > 3 else None)


class Objective:
    """A contrastive loss: its logits, batch loss ``L(B)`` (summed over anchors) and JEST scorer.

    Subclasses are pair-decomposable (``pair_loss``) or anchor objectives (a per-anchor statistic of the
    negatives, see :class:`_Anchor`).
    """

    name: ClassVar[str]
    pair: ClassVar[bool] = False
    needs_bias: ClassVar[bool] = False
    false_negatives: Optional[FalseNegatives] = None
    negatives: Optional[Negatives] = None
    #: batch columns ``training_loss`` reads besides the features (the steered losses: the cached reference's)
    reference_keys: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        return {}

    def spec(self) -> Any:
        """The canonical loss spec: the name, or ``{'name': ..., **params}``."""
        p = self.params()
        if self.false_negatives is not None:
            fn = self.false_negatives
            p['false_negatives'] = {k: v for k, v in (('key', fn.key), ('threshold', fn.threshold),
                                                      ('modality', fn.modality)) if v is not None}
        if self.negatives is not None:
            p['negatives'] = {'queue_size': self.negatives.queue_size, 'momentum': self.negatives.momentum}
        return {'name': self.name, **p} if p else self.name

    @property
    def blockwise(self) -> bool:
        """Whether JEST can score it matrix-free and across ranks (``scope='global'``): every objective can,
        but not with false negatives or a negatives queue."""
        return self.false_negatives is None and self.negatives is None

    @property
    def uses_model_scale(self) -> bool:
        """Whether the loss reads the model's learned logit scale (not a fixed temperature, not cosines)."""
        return True

    def scale(self, features: Features) -> torch.Tensor:
        """The logit scale ``t`` the objective uses."""
        return torch.as_tensor(features['logit_scale'], device=features['image_features'].device).float().reshape(())

    def logits(self, features: Features) -> torch.Tensor:
        """``[N, N]`` float32 ``l_ij`` (image ``i``, text ``j``)."""
        image, text = features['image_features'].float(), features['text_features'].float()
        logits = self.scale(features) * (image @ text.T)
        if self.needs_bias:
            bias = features.get('logit_bias')
            if bias is None:
                raise ValueError(f'loss {self.name!r} needs logit_bias: create the model with init_logit_bias')
            logits = logits + torch.as_tensor(bias, device=logits.device).float().reshape(())
        return logits

    def queue_logits(self, features: Features) -> Optional[QueueLogits]:
        """The anchors' logits against the queued negatives ``features`` carries (``QUEUE_KEYS``), or ``None``."""
        if QUEUE_KEYS[1] not in features:
            return None
        if self.pair:
            raise ValueError(f'a negatives queue needs an anchor (softmax-family) loss, not {self.name!r}')
        scale = self.scale(features)
        image, text = features['image_features'].float(), features['text_features'].float()
        return QueueLogits(scale * image @ features[QUEUE_KEYS[1]].float().T,
                           scale * text @ features[QUEUE_KEYS[0]].float().T, features[QUEUE_KEYS[2]].bool())

    def set_loss(self, logits: torch.Tensor, indices: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                 queue: Optional[QueueLogits] = None) -> torch.Tensor:
        """``L(B)``: the summed loss of the set ``indices`` (default: all) on ``logits`` (+ ``queue`` negatives)."""
        raise NotImplementedError

    def training_loss(self, features: Features, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mean loss ``L(B) / |B|`` of a (possibly globally gathered) batch's features (and its queue)."""
        logits = self.logits(features)
        return self.set_loss(logits, mask=mask, scale=self.scale(features),
                             queue=self.queue_logits(features)) / logits.shape[0]

    def per_example(self, logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None, queue: Optional[QueueLogits] = None) -> torch.Tensor:
        """``[N]``: each example's own terms with all the others as negatives (independent selection)."""
        raise NotImplementedError

    def scorer(self, terms: Sequence[tuple[torch.Tensor, float, torch.Tensor]], mask: Optional[torch.Tensor] = None):
        """The exact conditional scorer of ``Σ_t w_t L_t`` over terms ``(logits, weight, scale[, queue])``."""
        raise NotImplementedError


class Sigmoid(Objective):
    """SigLIP's pair loss; ``L(B) / |B|`` equals open_clip's ``SigLipLoss``."""

    name = 'sigmoid'
    pair = True
    needs_bias = True

    def __init__(self, false_negatives: Optional[Mapping] = None):
        self.false_negatives = false_negatives_spec(false_negatives)

    def pair_loss(self, logits: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, N]``: ``softplus(-l_ii)`` on the diagonal, ``softplus(l_ij)`` off it, 0 on false negatives."""
        loss = F.softplus(logits)
        loss = torch.where(torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device),
                           F.softplus(-logits), loss)
        return loss if mask is None else loss.masked_fill(mask.to(loss.device), 0.0)

    def set_loss(self, logits, indices=None, mask=None, scale=None, queue=None):
        if indices is not None:
            logits = logits[indices][:, indices]
            mask = mask[indices][:, indices] if mask is not None else None
        return self.pair_loss(logits, mask).sum()

    def per_example(self, logits, mask=None, scale=None, queue=None):
        return torch.diagonal(self.pair_loss(logits, mask))

    def scorer(self, terms, mask=None):
        from composer_jest.core.selection import PairScorer  # noqa: PLC0415  (selection imports nothing of ours)

        return PairScorer(sum(w * self.pair_loss(logits, mask) for logits, w, _, _ in map(_term, terms)))


class _Anchor(Objective):
    """An objective ``Σ_i Σ_dir w_dir g(s_i, l_ii)`` where ``s_i`` summarises anchor ``i``'s negatives.

    Subclasses give the statistic as three functions: ``reduce`` (of a row of negatives), ``merge`` (one
    more negative) and ``value`` ``g`` (zero for an empty statistic). Directions: ``'image'`` (row ``i``
    of ``l``, anchors are images) and ``'text'`` (column ``i``).
    """

    directions: ClassVar[tuple[str, ...]] = ('image', 'text')

    def __init__(self, temperature: Optional[float] = None, false_negatives: Optional[Mapping] = None,
                 negatives: Optional[Mapping] = None):
        self.negatives = negatives_spec(negatives)
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f'{self.name}.temperature must be a float > 0 (fixed) or null (learned), got '
                             f'{temperature!r}')
        self.temperature = temperature
        self.false_negatives = false_negatives_spec(false_negatives)

    def params(self) -> dict[str, Any]:
        return {'temperature': self.temperature} if self.temperature is not None else {}

    @property
    def uses_model_scale(self) -> bool:
        return self.temperature is None

    def scale(self, features):
        if self.temperature is None:
            return super().scale(features)
        return torch.tensor(1.0 / self.temperature, device=features['image_features'].device)

    # -- the statistic (subclasses) -------------------------------------------------------------------------
    def reduce(self, neg: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> tuple:
        """Statistic of each row of ``neg`` over its ``valid`` entries (``pos``: the rows' positives)."""
        raise NotImplementedError

    def merge(self, stat: tuple, value: torch.Tensor, pos: torch.Tensor) -> tuple:
        """``stat`` with one more negative ``value`` (broadcasting)."""
        raise NotImplementedError

    def value(self, stat: tuple, pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The anchor loss ``g``."""
        raise NotImplementedError

    def empty(self, n: int, device) -> tuple:
        """The statistic of no negatives, for ``n`` anchors."""
        raise NotImplementedError

    def combine(self, a: tuple, b: tuple) -> tuple:
        """The statistic of two disjoint sets of negatives (blockwise scoring absorbs a block at a time)."""
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------------------------
    def _views(self, logits: torch.Tensor, valid: torch.Tensor, queue: Optional[QueueLogits] = None):
        """Per direction: ``(view, ok, queued)`` with ``view[i, j]`` anchor ``i``'s logit with in-batch ``j``,
        ``ok`` its negatives, ``queued`` ``(logits [N, K], ok [N, K])`` against the queue or ``None``."""
        for direction in self.directions:
            queued = None
            if queue is not None:
                q = queue.image if direction == 'image' else queue.text
                queued = (q, queue.valid[None, :].expand_as(q))
            yield (logits, valid, queued) if direction == 'image' else (logits.T, valid.T, queued)

    def _stat(self, neg: torch.Tensor, ok: torch.Tensor, queued: Optional[tuple], rows, pos: torch.Tensor) -> tuple:
        """The statistic of in-batch negatives ``neg`` plus the queue's negatives of anchors ``rows``."""
        if queued is not None:
            neg, ok = torch.cat([neg, queued[0][rows]], 1), torch.cat([ok, queued[1][rows]], 1)
        return self.reduce(neg, ok, pos)

    @property
    def _weight(self) -> float:
        return 1.0 / len(self.directions)

    def set_loss(self, logits, indices=None, mask=None, scale=None, queue=None):
        if indices is not None:
            logits = logits[indices][:, indices]
            mask = mask[indices][:, indices] if mask is not None else None
            queue = queue.rows(indices) if queue is not None else None
        return self.per_example(logits, mask, scale, queue).sum()

    def per_example(self, logits, mask=None, scale=None, queue=None):
        scale = _default_scale(scale, logits)
        valid = negative_pairs(logits.shape[0], mask, logits.device)
        out = logits.new_zeros(logits.shape[0])
        for view, ok, queued in self._views(logits, valid, queue):
            pos = torch.diagonal(view)
            out = out + self._weight * self.value(self._stat(view, ok, queued, slice(None), pos), pos, scale)
        return out

    def scorer(self, terms, mask=None):
        return AnchorScorer(self, terms, mask)


def _default_scale(scale, logits):
    return torch.ones((), device=logits.device) if scale is None else scale


def _masked(neg: torch.Tensor, valid: torch.Tensor, fill: float) -> torch.Tensor:
    return neg.masked_fill(~valid, fill)


class Softmax(_Anchor):
    """InfoNCE: ``g = log(e^{l_ii} + e^{s}) - l_ii``, ``s = LSE_{j≠i} l_ij``; ``L(B) / |B|`` is ``ClipLoss``."""

    name = 'softmax'

    def reduce(self, neg, valid, pos):
        return (_masked(neg, valid, _NEG_INF).logsumexp(-1),)

    def merge(self, stat, value, pos):
        return (torch.logaddexp(stat[0], value),)

    def empty(self, n, device):
        return (torch.full((n,), _NEG_INF, device=device),)

    def combine(self, a, b):
        return (torch.logaddexp(a[0], b[0]),)

    def value(self, stat, pos, scale):
        return torch.logaddexp(stat[0], pos) - pos


class DCL(Softmax):
    """Decoupled contrastive loss: ``g = LSE_{j≠i} l_ij - l_ii`` (0 with no negatives)."""

    name = 'dcl'

    def value(self, stat, pos, scale):
        lse = stat[0]
        finite = lse > _NEG_INF
        return torch.where(finite, lse - pos, torch.zeros_like(lse))


class NPair(Softmax):
    """Multi-class N-pair loss: the image→text direction of InfoNCE only."""

    name = 'npair'
    directions = ('image',)


class HCL(_Anchor):
    """Robinson et al.'s hard-negative loss with debiasing (see the module docstring), in log space.

    Statistic ``(A, B, M)``: ``A = LSE_j (1+β) l_ij``, ``B = LSE_j β l_ij``, ``M`` negatives. Then
    ``log(M Σ e^{(1+β)l} / Σ e^{βl}) = log M + A - B``.
    """

    name = 'hcl'

    def __init__(self, beta: float = 1.0, tau_plus: float = 0.1, temperature: Optional[float] = None,
                 false_negatives: Optional[Mapping] = None, negatives: Optional[Mapping] = None):
        super().__init__(temperature, false_negatives, negatives)
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f'hcl.beta must be a float >= 0, got {beta!r}')
        if not (isinstance(tau_plus, (int, float)) and 0 <= tau_plus < 1):
            raise ValueError(f'hcl.tau_plus must be a float in [0, 1), got {tau_plus!r}')
        self.beta, self.tau_plus = float(beta), float(tau_plus)

    def params(self):
        return {'beta': self.beta, 'tau_plus': self.tau_plus, **super().params()}

    def reduce(self, neg, valid, pos):
        a = _masked((1 + self.beta) * neg, valid, _NEG_INF).logsumexp(-1)
        b = _masked(self.beta * neg, valid, _NEG_INF).logsumexp(-1)
        return a, b, valid.sum(-1).to(neg.dtype)

    def merge(self, stat, value, pos):
        a, b, m = stat
        return torch.logaddexp(a, (1 + self.beta) * value), torch.logaddexp(b, self.beta * value), m + 1

    def empty(self, n, device):
        inf = torch.full((n,), _NEG_INF, device=device)
        return inf, inf.clone(), torch.zeros(n, device=device)

    def combine(self, a, b):
        return torch.logaddexp(a[0], b[0]), torch.logaddexp(a[1], b[1]), a[2] + b[2]

    def value(self, stat, pos, scale):
        a, b, m = stat
        some = m > 0
        safe_m = torch.where(some, m, torch.ones_like(m))
        log_m = safe_m.log()
        reweighted = torch.where(some, log_m + a - b, torch.zeros_like(a))  # log(M Σe^{(1+β)l} / Σe^{βl})
        # log(reweighted - τ⁺ M e^{l_ii}) where positive, else -inf (then the floor applies)
        if self.tau_plus > 0:
            diff = pos + math.log(self.tau_plus) + log_m - reweighted
            inner = torch.where(diff < 0, reweighted + torch.log1p(-torch.exp(diff.clamp(max=0))),
                                torch.full_like(diff, _NEG_INF))
        else:
            inner = reweighted
        log_ng = torch.maximum(inner - math.log1p(-self.tau_plus), log_m - scale)  # floor M e^{-t}
        loss = torch.logaddexp(pos, log_ng) - pos
        return torch.where(some, loss, torch.zeros_like(loss))


class Triplet(_Anchor):
    """Margin loss on cosine similarities with the hardest or the semi-hard in-batch negative.

    Statistic: ``(max_j s_ij, max_{j: s_ij < s_ii} s_ij, min_j s_ij)`` over the negatives.
    """

    name = 'triplet'
    MINING: ClassVar[tuple[str, ...]] = ('hardest', 'semi-hard')

    def __init__(self, margin: float = 0.2, mining: str = 'hardest', false_negatives: Optional[Mapping] = None,
                 negatives: Optional[Mapping] = None):
        super().__init__(None, false_negatives, negatives)
        if not (isinstance(margin, (int, float)) and margin >= 0):
            raise ValueError(f'triplet.margin must be a float >= 0, got {margin!r}')
        if mining not in self.MINING:
            raise ValueError(f'triplet.mining must be one of {self.MINING}, got {mining!r}')
        self.margin, self.mining = float(margin), mining

    def params(self):
        return {'margin': self.margin, 'mining': self.mining}

    @property
    def uses_model_scale(self) -> bool:
        return False

    def scale(self, features):
        return torch.ones((), device=features['image_features'].device)

    def reduce(self, neg, valid, pos):
        below = valid & (neg < pos[..., None])
        return (_masked(neg, valid, _NEG_INF).amax(-1), _masked(neg, below, _NEG_INF).amax(-1),
                _masked(neg, valid, math.inf).amin(-1))

    def merge(self, stat, value, pos):
        hardest, below, least = stat
        below = torch.where(value < pos, torch.maximum(below, value), below)
        return torch.maximum(hardest, value), below, torch.minimum(least, value)

    def empty(self, n, device):
        inf = torch.full((n,), math.inf, device=device)
        return -inf, -inf, inf.clone()

    def combine(self, a, b):
        return torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1]), torch.minimum(a[2], b[2])

    def value(self, stat, pos, scale):
        hardest, below, least = stat
        if self.mining == 'hardest':
            chosen = hardest
        else:
            chosen = torch.where(below > _NEG_INF, below, least)
        some = hardest > _NEG_INF
        safe = torch.where(some, chosen, pos)
        return torch.where(some, F.relu(self.margin + safe - pos), torch.zeros_like(pos))


class AnchorScorer:
    """Exact conditional score of an anchor objective for :func:`~composer_jest.core.selection.joint_sample`.

    For the chosen set ``C`` and candidate ``k``, ``Δ_k = L(C ∪ {k}) - L(C)`` is ``k``'s own terms with ``C``
    as its negatives, plus, for every chosen anchor ``i`` that ``k`` is a negative of, the change
    ``g(merge(s_i, l_ik)) - g(s_i)``. Each update costs ``O(N |C|)``; a singleton's loss is 0, so the first
    chunk is drawn uniformly. (Generalises :class:`~composer_jest.core.losses.SoftmaxScorer` to any statistic.)
    """

    def __init__(self, objective: _Anchor, terms: Sequence[tuple], mask: Optional[torch.Tensor] = None):
        if not terms:
            raise ValueError('AnchorScorer needs at least one (logits, weight, scale[, queue]) term')
        self.objective = objective
        self.terms = [_term(t) for t in terms]
        self.num_items = self.terms[0][0].shape[0]
        device = self.terms[0][0].device
        self.valid = negative_pairs(self.num_items, mask, device)
        self._chosen = torch.empty(0, dtype=torch.long, device=device)

    def initial(self) -> torch.Tensor:
        """Zero (a singleton has no negatives) unless a queue gives every example its queued negatives."""
        total = torch.zeros(self.num_items, device=self.terms[0][0].device)
        for logits, w, scale, queue in self.terms:
            if queue is not None:
                no_batch = torch.ones_like(logits, dtype=torch.bool)  # every in-batch pair masked: the queue only
                total = total + w * self.objective.per_example(logits, no_batch, scale, queue)
        return total

    def add(self, new: torch.Tensor) -> torch.Tensor:
        self._chosen = torch.cat([self._chosen, new])
        return sum(w * self._gain(logits, scale, queue) for logits, w, scale, queue in self.terms)

    def _gain(self, logits: torch.Tensor, scale: torch.Tensor, queue: Optional[QueueLogits]) -> torch.Tensor:
        obj, c = self.objective, self._chosen
        total = torch.zeros(self.num_items, device=logits.device)
        for view, ok, queued in obj._views(logits, self.valid, queue):
            pos = torch.diagonal(view)
            own = obj.value(obj._stat(view[:, c], ok[:, c], queued, slice(None), pos), pos, scale)  # C: k's negatives
            pos_c = pos[c][:, None]
            old = obj._stat(view[c][:, c], ok[c][:, c], queued, c, pos[c])  # s_i over C \ {i} and the queue
            old = tuple(s[:, None] for s in old)
            before = obj.value(old, pos_c, scale)
            after = obj.value(obj.merge(old, view[c, :], pos_c), pos_c, scale)  # [|C|, N]: k joins i's negatives
            change = torch.where(ok[c, :], after - before, torch.zeros_like(after))
            total = total + obj._weight * (own + change.sum(0))
        return total


_false_negatives = false_negatives_spec  # the old private name, still imported by core/steering.py


for _cls, _name in ((Sigmoid, 'sigmoid'), (Softmax, 'softmax'), (DCL, 'dcl'), (HCL, 'hcl'),
                    (Triplet, 'triplet'), (NPair, 'npair')):
    LOSS_REGISTRY.register(_name, func=_cls)


def build_objective(spec: Any, where: str = 'loss') -> Objective:
    """An :class:`Objective` from a loss spec: a registered name or ``{'name': ..., **params}`` (or an objective).

    Unknown names and parameters fail naming ``where``, the registered losses and the accepted parameters.

    Example:
        >>> build_objective({'name': 'hcl', 'beta': 0.5}).spec()
        {'name': 'hcl', 'beta': 0.5, 'tau_plus': 0.1}
        >>> build_objective('softmax').spec()
        'softmax'
    """
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and 'name' in spec:
        params = {k: v for k, v in dict(spec).items() if k != 'name'}
        name = spec['name']
    else:
        raise ValueError(f"{where} must be a loss name or a dict {{name: ..., <parameters>}}, got {spec!r}; "
                         f'registered losses: {loss_names()}')
    if name not in LOSS_REGISTRY.get_all():
        raise ValueError(f'{where}: unknown loss {name!r}; registered losses: {loss_names()}')
    factory = LOSS_REGISTRY.get(name)
    accepted = [p for p in inspect.signature(factory).parameters if p != 'self']
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f'{where}: unknown parameter(s) {unknown} of loss {name!r}; it accepts {accepted}')
    try:
        return factory(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: {e}') from e


from composer_jest.core import steering as _steering  # noqa: E402,F401  registers 'drrho' and 'distill' (core/steering)
