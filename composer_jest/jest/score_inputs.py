"""What JEST scores a super-batch with: the learner's features (through the model contract) and the reference's
(cached columns or live towers), under the trainer's precision and without autograd.

Composer-aware (it reads the trainer's precision and FSDP state); the selection math that consumes the features
is in :mod:`composer_jest.core.scoring`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from composer.core import State, get_precision_context

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.contract import ScoringModel, scoring_model
from composer_jest.core.scoring import Features, check_finite
from composer_jest.core.selection import SCORE_TERMS
from composer_jest.jest.reference import ReferenceScorer, ReferenceSpec

__all__ = ['ScoreInputs']


class ScoreInputs:
    """The learner and reference features of one super-batch.

    Args:
        reference: the reference spec (see :class:`~composer_jest.jest.reference.ReferenceScorer`).
        score: which models run (:data:`~composer_jest.core.selection.SCORE_TERMS`).
        learner_patch_size: the learner scores at this patch size (FlexiViT); ``None`` = native.
        fast_scoring: ``inference_mode`` (``no_grad`` for an FSDP-wrapped learner: FSDP's gathered parameters
            would become inference tensors the training forward cannot save) and, under ``amp_bf16``, a live
            reference held and run in bf16 end to end.
        compile_scoring: ``torch.compile`` the learner's ``score_features`` (``True`` or compile kwargs).
    """

    def __init__(self, reference: Optional[ReferenceSpec], score: str, learner_patch_size: Optional[int],
                 fast_scoring: bool = True, compile_scoring: Union[bool, dict] = False):
        if not isinstance(fast_scoring, bool):
            raise ValueError(f'fast_scoring must be True or False, got {fast_scoring!r}')
        if not isinstance(compile_scoring, (bool, dict)):
            raise ValueError(
                f'compile_scoring must be True, False or a dict of torch.compile kwargs, got {compile_scoring!r}')
        models = dict(SCORE_TERMS[score])
        self.uses_learner, self.uses_reference = 'learner' in models, 'reference' in models
        self.reference = ReferenceScorer(reference)
        self.learner_patch_size, self.fast, self.compile = learner_patch_size, fast_scoring, compile_scoring
        self._compiled: Optional[Any] = None

    def prepare(self, state: State, model: ScoringModel) -> None:
        """At fit start: the reference on the device (bf16 under fast ``amp_bf16``), the patch size checked."""
        if self.uses_reference:
            bf16 = self.fast and str(getattr(state.precision, 'value', state.precision)) == 'amp_bf16'
            self.reference.prepare(model.spec, state.device._device, bf16)
        if self.uses_learner:
            model.check_scoring_patch_size(self.learner_patch_size)

    def __call__(self, state: State, batch: dict, image_key: str, text_key: str, patch_size: Optional[int] = None
                 ) -> tuple[Optional[Features], Optional[Features]]:
        """Learner and reference features; ``patch_size`` overrides ``learner_patch_size`` (two-stage decoding
        scores low-resolution images at the patch giving the same token grid)."""
        image, text = batch[image_key], batch[text_key]
        learner = reference = None
        precision = state.precision, state.precision_config
        with self._grad_mode(state, learner=True), get_precision_context(*precision):
            if self.uses_learner:  # eval semantics: the contract's promise
                patch = patch_size if patch_size is not None else self.learner_patch_size
                learner = dict(self._learner(state)(batch, patch))
        with self._grad_mode(state, learner=False), get_precision_context(*precision):
            if self.uses_reference:
                reference = self.reference.features(batch, image, text)
        if learner is None and reference is None:  # uniform: nothing to score
            zeros = torch.zeros(image.shape[0], 1, device=image.device)
            learner = dict(image_features=zeros, text_features=zeros, logit_scale=torch.ones((), device=image.device),
                           logit_bias=torch.zeros((), device=image.device))
        return learner, reference

    def name_non_finite(self, batch: dict, image_key: str, learner: Optional[Features],
                        reference: Optional[Features], step: int) -> None:
        """Raise naming which input (batch, learner, reference or cached columns) holds NaN/inf, and the step."""
        check_finite({'image': batch[image_key]}, 'input batch', step)
        check_finite(learner, f'learner scoring (learner_patch_size={self.learner_patch_size})', step)
        cached = all(k in batch for k in CACHED_REFERENCE_KEYS)
        spec = self.reference.spec
        described = f'a {type(spec).__name__} module' if isinstance(spec, torch.nn.Module) else repr(spec)
        check_finite(reference, f'cached reference columns {CACHED_REFERENCE_KEYS}' if cached
                     else f'reference model ({described})', step)

    def _grad_mode(self, state: State, learner: bool):
        if self.fast and not (learner and getattr(state, 'fsdp_enabled', False)):
            return torch.inference_mode()
        return torch.no_grad()

    def _learner(self, state: State):
        """The learner's ``score_features`` (the model contract), compiled once if asked."""
        score = scoring_model(state.model).score_features
        if not self.compile:
            return score
        if self._compiled is None:
            kwargs = self.compile if isinstance(self.compile, dict) else {}
            self._compiled = torch.compile(score, **kwargs)  # shares the model's parameters
        return self._compiled
