"""The batch schema and the super-batch / sub-batch relation, in one place.

Keys of the batches the data path yields and the model and JEST read: :data:`IMAGE_KEY`, :data:`TEXT_KEY`,
:data:`INDEX_KEY` (a stable example id), :data:`LABEL_KEY` (zero-shot evaluation), :data:`ENCODED_IMAGE_KEY`
(two-stage decoding), and the cached reference columns :data:`CACHED_REFERENCE_KEYS` that
``composer-jest embed-reference`` writes.

JEST streams a super-batch of ``N`` examples per rank and trains on ``b`` of them, with filter ratio
``f = 1 - b / N``. The config says ``b`` (``global_train_batch_size``) and ``f``; the loader is told ``N``
(:func:`superbatch_size`) and never sees ``f``; the algorithm draws ``b = round(N (1 - f))``
(:func:`subbatch_size`) from whatever ``N`` arrives.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Optional, TypedDict

import torch

__all__ = ['IMAGE_KEY', 'TEXT_KEY', 'INDEX_KEY', 'LABEL_KEY', 'ENCODED_IMAGE_KEY', 'CACHED_REFERENCE_KEYS', 'Features',
           'check_filter_ratio', 'superbatch_size', 'subbatch_size', 'subset_batch', 'loader_batch_keys',
           'check_train_batches']

IMAGE_KEY, TEXT_KEY, INDEX_KEY, LABEL_KEY = 'image', 'text', 'index', 'label'
# Two-stage decoding (composer_jest.data.two_stage): the encoded image file of each example, decoded in full only
# if JEST selects it; the batch's IMAGE_KEY then holds the low-resolution scoring images.
ENCODED_IMAGE_KEY = 'image_bytes'
# Batch columns written by `composer-jest embed-reference`: features are L2-normalised float16.
CACHED_REFERENCE_KEYS = ('ref_image_features', 'ref_text_features', 'ref_logit_scale', 'ref_logit_bias')


class Features(TypedDict, total=False):
    """One model's view of a super-batch: what a CLIP forward returns, what the scorers and objectives read.

    A model with a negatives queue adds the ``QUEUE_KEYS`` of :mod:`composer_jest.core.objectives`.
    """

    image_features: torch.Tensor  # [N, d], L2-normalised
    text_features: torch.Tensor  # [N, d], L2-normalised
    logit_scale: torch.Tensor | float  # the scale t itself (not its log)
    logit_bias: Optional[torch.Tensor | float]  # b (sigmoid loss only)


def check_filter_ratio(filter_ratio: float) -> None:
    """Raise ``ValueError`` unless ``filter_ratio`` is a float in ``[0, 1)`` (the one check of ``f``)."""
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
    check_filter_ratio(filter_ratio)
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
    check_filter_ratio(filter_ratio)
    return max(1, int(round(superbatch * (1.0 - filter_ratio))))


def subset_batch(batch: Any, indices: torch.Tensor, num_samples: int) -> Any:
    """Index every per-sample entry (dim 0 of size ``num_samples``) of a dict/list/tuple batch."""
    if isinstance(batch, torch.Tensor):
        return batch[indices.to(batch.device)] if batch.shape[:1] == (num_samples,) else batch
    if isinstance(batch, dict):
        return {k: subset_batch(v, indices, num_samples) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == num_samples and not any(isinstance(v, torch.Tensor) for v in batch):
            return type(batch)(batch[i] for i in indices.tolist())  # per-sample python values
        return type(batch)(subset_batch(v, indices, num_samples) for v in batch)
    return batch


def loader_batch_keys(loader: Any) -> Optional[frozenset]:
    """The keys of every batch ``loader`` yields, when its dataset declares them, else ``None``.

    The contract for data sources: a ``DataLoader`` whose ``dataset`` has a ``batch_keys`` attribute (the keys of
    each item, e.g. :class:`~composer_jest.data.streaming.ImageTextStreamingDataset` from its shards' columns) is
    checked against what the run reads (``track_keys``, ``label``, cached reference columns) before training.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from composer_jest.data.demo.shapes import ShapesDataset
        >>> sorted(loader_batch_keys(DataLoader(ShapesDataset(4))))
        ['clean', 'image', 'index', 'label', 'text']
        >>> loader_batch_keys([{'image': None}]) is None  # undeclared: checked when the batch arrives
        True
    """
    keys = getattr(getattr(loader, 'dataset', None), 'batch_keys', None)
    return frozenset(keys) if keys is not None else None


def check_train_batches(loader: Any, name: str = 'train_loader') -> None:
    """Fail when a training ``loader`` yields no batch at all (its dataset is smaller than one batch).

    Training drops a last partial batch, and under JEST a batch is the whole super-batch ``N = b / (1 - f)``: a
    dataset of fewer than ``N`` examples per rank then yields nothing, and Composer would start epoch after empty
    epoch without ever taking a step. A loader without a length (an iterable) is not checked.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from composer_jest.data.demo.shapes import ShapesDataset
        >>> check_train_batches(DataLoader(ShapesDataset(8), batch_size=8, drop_last=True))  # one batch: fine
        >>> check_train_batches(DataLoader(ShapesDataset(8), batch_size=10, drop_last=True))
        Traceback (most recent call last):
        ...
        ValueError: train_loader yields no batch: 8 examples per rank do not fill one batch of 10 ...
    """
    try:
        batches = len(loader)
    except TypeError:
        return
    if batches > 0:
        return
    dataset = getattr(loader, 'dataset', None)
    try:
        examples = f'{len(dataset)} examples per rank'
    except TypeError:
        examples = 'the examples per rank'
    batch = getattr(loader, 'batch_size', None)
    raise ValueError(f'{name} yields no batch: {examples} do not fill one batch of {batch} (training drops a partial '
                     'batch; with JEST a batch is the super-batch N = b / (1 - filter_ratio) per rank), so training '
                     'would never take a step. Add data, or lower global_train_batch_size or '
                     'algorithms.jest.filter_ratio.')
