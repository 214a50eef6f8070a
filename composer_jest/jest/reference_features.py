"""Live reference features for the steered losses, when the shards carry no cached embeddings.

A steered ``model.loss`` (``drrho``, ``distill``: :mod:`composer_jest.core.steering`) reads the reference from the
batch columns that ``composer-jest embed-reference`` caches (:data:`~composer_jest.core.batch.CACHED_REFERENCE_KEYS`).
:class:`ReferenceFeatures` runs a frozen reference on every training batch instead and writes the same columns
(features L2-normalised, the logit scale ``t = exp(s)`` and bias -- 0 without one -- repeated per example), so one
loss reads cached and live references alike. It costs one reference forward per trained batch (no backward).

With JEST, list it after ``JEST``: Composer applies algorithms in order, so it embeds only the selected sub-batch.
A batch that already carries the columns is left as it is (cached embeddings win, as in JEST's scoring).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State, get_precision_context
from composer.loggers import Logger

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, IMAGE_KEY, TEXT_KEY, Features
from composer_jest.core.contract import scoring_model
from composer_jest.jest.reference import ReferenceScorer, ReferenceSpec

__all__ = ['ReferenceFeatures', 'reference_columns']


def reference_columns(features: Features, n: int) -> dict[str, torch.Tensor]:
    """The cached-column layout of a reference's ``features`` for ``n`` examples (as ``embed-reference`` writes).

    Example:
        >>> f = {'image_features': torch.eye(2), 'text_features': torch.eye(2), 'logit_scale': torch.tensor(10.),
        ...      'logit_bias': None}
        >>> cols = reference_columns(f, 2)
        >>> cols['ref_logit_scale'].tolist(), cols['ref_logit_bias'].tolist()
        ([10.0, 10.0], [0.0, 0.0])
    """
    image, text = (features[k].detach().float() for k in ('image_features', 'text_features'))  # no copy per step
    scale = torch.as_tensor(features['logit_scale'], device=image.device).detach().float().reshape(-1)[0]
    bias = features.get('logit_bias')
    bias = (torch.as_tensor(bias, device=image.device).detach().float().reshape(-1)[0] if bias is not None
            else torch.zeros((), device=image.device))
    return dict(zip(CACHED_REFERENCE_KEYS, (image, text, scale.expand(n).clone(), bias.expand(n).clone())))


class ReferenceFeatures(Algorithm):
    """Write a frozen reference's features of every training batch into it as the cached reference columns.

    Args:
        reference: a module, a checkpoint path (the learner's architecture), ``{'model', 'checkpoint'}`` or
            ``{'model', 'pretrained'}`` -- as JEST's ``reference`` (:mod:`composer_jest.jest.reference`).
        image_key / text_key: the batch's image and token columns.

    Example:
        >>> from composer_jest import CLIPModel
        >>> model = CLIPModel('jest-tiny', loss={'name': 'distill', 'form': 'sigmoid'})
        >>> algo = ReferenceFeatures(reference=CLIPModel('jest-tiny'))  # Trainer(..., algorithms=[algo])
    """

    def __init__(self, reference: ReferenceSpec, image_key: str = IMAGE_KEY, text_key: str = TEXT_KEY):
        if reference is None or reference == 'cached':
            raise ValueError(f'ReferenceFeatures.reference must be a model (a module, a checkpoint path, '
                             f"{{'model', 'checkpoint'}} or {{'model', 'pretrained'}}), got {reference!r}; with the "
                             'cached columns in the shards (`composer-jest embed-reference`) no algorithm is needed')
        self._reference = ReferenceScorer(reference)
        self.image_key, self.text_key = image_key, text_key

    @property
    def towers(self) -> Optional[Any]:
        """The frozen reference towers (``None`` before fit start for a bare checkpoint path)."""
        return self._reference.towers

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:  # a bare path takes the learner's architecture; kept out of the model (FSDP)
            self._reference.prepare(scoring_model(state.model).spec, state.device._device, bf16=False)
            return
        batch = state.batch
        if not isinstance(batch, dict) or self.image_key not in batch or self.text_key not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f'ReferenceFeatures needs dict batches with {self.image_key!r} and {self.text_key!r} '
                             f'(image_key / text_key), got {got}')
        if all(k in batch for k in CACHED_REFERENCE_KEYS):
            return
        image, text = batch[self.image_key], batch[self.text_key]
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            features = self._reference.features(batch, image, text)
        state.batch = {**batch, **reference_columns(features, image.shape[0])}
