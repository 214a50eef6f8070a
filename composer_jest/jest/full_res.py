"""JEST's side of two-stage decoding (:mod:`composer_jest.data.two_stage`): the loader yields low-resolution scoring
images plus the encoded files (``image_bytes``); the learner scores the low-resolution images at the patch that
gives ``learner_patch_size``'s token grid on full-resolution ones, and only the selected examples are decoded at
full resolution by the :class:`~composer_jest.data.two_stage.FullResDecoder`.
"""

from __future__ import annotations

from typing import Any, Optional

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, ENCODED_IMAGE_KEY
from composer_jest.data.two_stage import FullResDecoder
from composer_jest.models.flexi import scoring_patch_size

__all__ = ['check_full_res', 'two_stage_patch', 'decode_selected']


def check_full_res(full_res: Any) -> Optional[FullResDecoder]:
    """``full_res`` itself if it is a :class:`FullResDecoder` or ``None``; else a ``ValueError`` naming it."""
    if full_res is not None and not isinstance(full_res, FullResDecoder):
        raise ValueError(f'full_res must be a composer_jest.data.two_stage.FullResDecoder or None, got {full_res!r}')
    return full_res


def two_stage_patch(full_res: Optional[FullResDecoder], batch: dict, image_key: str,
                    learner_patch_size: Optional[int], uses_reference: bool, score: str) -> Optional[int]:
    """The learner's scoring patch for this super-batch: ``None`` (``learner_patch_size`` as given) for a one-stage
    batch, else ``p_learner * S_low / S`` for its low-resolution images (:func:`models.flexi.scoring_patch_size`).

    Raises ``ValueError`` when the batch and the decoder disagree (one without the other), or when a live
    reference would have to score the low-resolution images.
    """
    if ENCODED_IMAGE_KEY not in batch:
        if full_res is not None:
            raise ValueError(f'JEST has a full_res decoder but the batch has no {ENCODED_IMAGE_KEY!r} column: build '
                             'the loader with two-stage decoding (train_loader.two_stage)')
        return None
    if full_res is None:
        raise ValueError(f'the batch carries {ENCODED_IMAGE_KEY!r} (two-stage decoding) but JEST has no full_res '
                         'decoder: set train_loader.two_stage in the config, or pass JEST(full_res=...)')
    if uses_reference and not all(k in batch for k in CACHED_REFERENCE_KEYS):
        raise ValueError(f'two-stage decoding gives the scorers low-resolution images: score={score!r} needs '
                         'cached reference features (`composer-jest embed-reference`, reference: cached)')
    return scoring_patch_size(learner_patch_size, batch[image_key].shape[-1], full_res.image_size)


def decode_selected(full_res: Optional[FullResDecoder], sub_batch: dict, image_key: str, device: Any) -> dict:
    """Stage 2: the selected examples' files decoded at full resolution into ``image_key``, on ``device``."""
    if full_res is None:
        return sub_batch
    sub_batch[image_key] = full_res(sub_batch.pop(ENCODED_IMAGE_KEY))
    return device.batch_to_device(sub_batch)
