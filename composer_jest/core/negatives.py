"""Which in-batch pairs are negatives of each other: false negatives (:class:`FalseNegatives`: a shared id column,
or reference similarity above a threshold) leave them; a negatives queue (:class:`Negatives`, :class:`QueueLogits`)
adds a momentum encoder's earlier examples to them. The objectives (:mod:`composer_jest.core.objectives`) read
both; the selection step builds the false-negative mask of a super-batch (:func:`composer_jest.core.step.
false_negative_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from composer_jest.core.batch import Features

__all__ = ['FalseNegatives', 'Negatives', 'QUEUE_KEYS', 'QueueLogits', 'false_negatives_spec', 'negatives_spec',
           'negative_pairs']


@dataclass(frozen=True)
class FalseNegatives:
    """Which in-batch pairs are not negatives: same ``key`` column value, or reference similarity > ``threshold``.

    Args:
        key: a batch column of ids (e.g. ``label``, ``dup_id``); equal ids mark a pair.
        threshold: cosine similarity in ``(-1, 1)`` of the reference's embeddings above which a pair is marked.
        modality: ``image`` (image–image), ``text`` (text–text) or ``either`` (any of the two).

    Example:
        >>> fn = FalseNegatives(key='label')
        >>> fn.mask(fn.signature({'label': torch.tensor([3, 1, 3])})).int().tolist()
        [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    """

    key: Optional[str] = None
    threshold: Optional[float] = None
    modality: str = 'image'

    MODALITIES: ClassVar[tuple[str, ...]] = ('image', 'text', 'either')

    def __post_init__(self):
        if (self.key is None) == (self.threshold is None):
            raise ValueError(f'false_negatives needs exactly one of key (a batch column) or threshold (reference '
                             f'similarity), got key={self.key!r}, threshold={self.threshold!r}')
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and -1 < self.threshold < 1):
            raise ValueError(f'false_negatives.threshold must be a cosine similarity in (-1, 1), got '
                             f'{self.threshold!r}')
        if self.modality not in self.MODALITIES:
            raise ValueError(f'false_negatives.modality must be one of {self.MODALITIES}, got {self.modality!r}')

    def signature(self, batch: Mapping[str, Any], reference: Optional[Features] = None) -> torch.Tensor:
        """Per-example rows the mask is built from (ids ``[n]`` or reference embeddings ``[n, d]``); these are
        what ranks all-gather for a global mask."""
        if self.key is not None:
            if self.key not in batch:
                raise KeyError(f'false_negatives.key: {self.key!r} is not a batch key (the batch has {sorted(batch)})')
            return torch.as_tensor(batch[self.key]).reshape(-1)
        if reference is None:
            for name in ('ref_image_features', 'ref_text_features'):
                if name not in batch:
                    raise ValueError(f'false_negatives.threshold needs the reference embeddings: a reference model in '
                                     'JEST, or the batch columns ref_image_features/ref_text_features (missing '
                                     f'{name})')
            reference = {'image_features': batch['ref_image_features'], 'text_features': batch['ref_text_features']}
        parts = [reference[f'{m}_features'] for m in ('image', 'text') if self.modality in (m, 'either')]
        return torch.cat([F.normalize(p.float(), dim=-1) for p in parts], 1)

    def mask(self, signature: torch.Tensor) -> torch.Tensor:
        """``[n, n]`` bool, True where ``(i, j)``, ``i ≠ j``, is a false negative."""
        if self.key is not None:
            same = signature[:, None] == signature[None, :]
        else:
            d = signature.shape[1] // (2 if self.modality == 'either' else 1)
            parts = signature.split(d, 1)
            same = torch.zeros(signature.shape[0], signature.shape[0], dtype=torch.bool, device=signature.device)
            for p in parts:
                same |= (p @ p.T) > self.threshold
        return same & ~torch.eye(signature.shape[0], dtype=torch.bool, device=signature.device)


@dataclass(frozen=True)
class Negatives:
    """A negatives queue (MoCo): the last ``queue_size`` examples' embeddings by a momentum copy of the learner
    (``θ_m ← momentum θ_m + (1 - momentum) θ`` each step) are extra negatives of every anchor.

    The model keeps the copy and the queue (:class:`~composer_jest.models.negatives.NegativesQueue`); the loss and
    JEST's learner scores count the queue's filled slots (``QUEUE_KEYS`` of the features).
    """

    queue_size: int
    momentum: float = 0.999

    def __post_init__(self):
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f'negatives.queue_size must be an int >= 1, got {self.queue_size!r}')
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f'negatives.momentum must be a float in [0, 1), got {self.momentum!r}')


def negatives_spec(spec: Optional[Mapping]) -> Optional[Negatives]:
    """A loss spec's ``negatives:`` entry as :class:`Negatives` (``None`` without one); unknown keys are named."""
    if spec is None or isinstance(spec, Negatives):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f'negatives must be a dict {{queue_size: ..., momentum: ...}}, got {spec!r}')
    unknown = sorted(set(spec) - {'queue_size', 'momentum'})
    if unknown:
        raise ValueError(f'negatives: unknown key(s) {unknown}; valid keys: [queue_size, momentum]')
    return Negatives(**dict(spec))


def negative_pairs(n: int, mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[n, n]`` bool: ``j`` is a negative of anchor ``i`` (off the diagonal and not a false negative)."""
    valid = ~torch.eye(n, dtype=torch.bool, device=device)
    return valid if mask is None else valid & ~mask.to(device)


QUEUE_KEYS = ('queue_image_features', 'queue_text_features', 'queue_valid')


@dataclass
class QueueLogits:
    """Logits of a batch's anchors against ``K`` queued negatives (a momentum encoder's earlier examples).

    ``image[i, q] = t x_i·y^Q_q`` (image anchors vs queued texts), ``text[i, q] = t y_i·x^Q_q``; ``valid[q]``:
    the slot holds an example (the queue fills up during the first steps).
    """

    image: torch.Tensor  # [N, K]
    text: torch.Tensor  # [N, K]
    valid: torch.Tensor  # [K] bool

    def rows(self, indices: torch.Tensor) -> QueueLogits:
        return QueueLogits(self.image[indices], self.text[indices], self.valid)


def false_negatives_spec(spec: Optional[Mapping]) -> Optional[FalseNegatives]:
    """A loss spec's ``false_negatives:`` entry as :class:`FalseNegatives` (``None`` without one)."""
    if spec is None or isinstance(spec, FalseNegatives):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f'false_negatives must be a dict {{key: ...}} or {{threshold: ..., modality: ...}}, got '
                         f'{spec!r}')
    unknown = sorted(set(spec) - {'key', 'threshold', 'modality'})
    if unknown:
        raise ValueError(f'false_negatives: unknown key(s) {unknown}; valid keys: [key, threshold, modality]')
    return FalseNegatives(**dict(spec))
