"""What JEST scores a super-batch with: the learner's features (through the model contract) and the reference's
(cached columns or live towers), under the trainer's precision and without autograd.

Composer-aware (it reads the trainer's precision and FSDP state); the selection math that consumes the features
is in :mod:`composer_jest.core.scoring`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from composer.core import State, get_precision_context

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, Features
from composer_jest.core.contract import ScoringModel, scoring_model
from composer_jest.core.selection import SCORE_TERMS
from composer_jest.core.step import check_finite, compile_options
from composer_jest.jest.reference import ReferenceScorer, ReferenceSpec

__all__ = ['ScoreInputs']

Scorer = Callable[[dict], Features]


class ScoreInputs:
    """The learner and reference features of one super-batch.

    Args:
        reference: the reference spec (see :class:`~composer_jest.jest.reference.ReferenceScorer`); required when
            ``score`` uses the reference.
        score: which models run (:data:`~composer_jest.core.selection.SCORE_TERMS`).
        learner_patch_size: the learner scores at this patch size (FlexiViT); ``None`` = native.
        fast_scoring: ``inference_mode`` (``no_grad`` for an FSDP-wrapped learner: FSDP's gathered parameters
            would become inference tensors the training forward cannot save) and, under ``amp_bf16``, a live
            reference held and run in bf16 end to end.
        compile_scoring: ``torch.compile`` the learner's ``score_features`` (``True`` or compile kwargs).
    """

    def __init__(self, reference: Optional[ReferenceSpec], score: str, learner_patch_size: Optional[int],
                 fast_scoring: bool = True, compile_scoring: Union[bool, dict] = False):
        if learner_patch_size is not None and (not isinstance(learner_patch_size, int) or learner_patch_size < 1):
            raise ValueError(f'learner_patch_size must be a positive int or None, got {learner_patch_size!r}')
        models = dict(SCORE_TERMS[score])
        if 'reference' in models and reference is None:
            raise ValueError(f"score={score!r} needs a reference model; pass reference=... (or score='hard_learner')")
        if not isinstance(fast_scoring, bool):
            raise ValueError(f'fast_scoring must be True or False, got {fast_scoring!r}')
        self.compile = compile_options(compile_scoring, 'compile_scoring')
        self.uses_learner, self.uses_reference = 'learner' in models, 'reference' in models
        self.reference = ReferenceScorer(reference)
        self.learner_patch_size, self.fast = learner_patch_size, fast_scoring
        self._compiled: Optional[Any] = None

    def prepare(self, state: State, model: ScoringModel) -> None:
        """At fit start: the reference on the device (bf16 under fast ``amp_bf16``), the patch size checked."""
        if self.uses_reference:
            bf16 = self.fast and str(getattr(state.precision, 'value', state.precision)) == 'amp_bf16'
            self.reference.prepare(model.spec, state.device._device, bf16)
        if self.uses_learner:
            model.check_scoring_patch_size(self.learner_patch_size)

    def scorers(self, state: State, image_key: str, text_key: str, patch_size: Optional[int] = None
                ) -> tuple[Optional[Scorer], Optional[Scorer]]:
        """``batch -> Features`` of the learner and of the reference (``None`` where the score does not use it),
        each under the trainer's precision and without autograd; ``patch_size`` overrides ``learner_patch_size``
        (two-stage decoding scores low-resolution images at the patch giving the same token grid)."""
        precision = state.precision, state.precision_config
        learner = reference = None
        if self.uses_learner:  # eval semantics: the contract's promise
            score, patch = self._learner(state), patch_size if patch_size is not None else self.learner_patch_size

            def learner(batch: dict) -> Features:
                with self._grad_mode(state, learner=True), get_precision_context(*precision):
                    return dict(score(batch, patch))
        if self.uses_reference:
            def reference(batch: dict) -> Features:
                with self._grad_mode(state, learner=False), get_precision_context(*precision):
                    return self.reference.features(batch, batch[image_key], batch[text_key])
        return learner, reference

    def __call__(self, state: State, batch: dict, image_key: str, text_key: str, patch_size: Optional[int] = None
                 ) -> tuple[Optional[Features], Optional[Features]]:
        """The learner and reference features of ``batch`` (``None`` where the score does not use the model)."""
        return tuple(f(batch) if f is not None else None for f in self.scorers(state, image_key, text_key, patch_size))

    def flop_kwargs(self, batch: dict) -> dict[str, Any]:
        """What :meth:`ScoringModel.step_flops` needs to know of the scoring (cached reference, models, patch)."""
        return dict(reference_cached=all(k in batch for k in CACHED_REFERENCE_KEYS),
                    learner_patch_size=self.learner_patch_size, reference_clip=self.reference.towers,
                    uses_reference=self.uses_reference, uses_learner=self.uses_learner)

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
        if self.compile is None:
            return score
        if self._compiled is None:
            self._compiled = torch.compile(score, **self.compile)  # shares the model's parameters
        return self._compiled
