"""What JEST needs from the learner: a declared contract instead of attribute guessing.

:class:`~composer_jest.models.clip.CLIPModel` implements it; a user's own ``ComposerModel`` can too, and then trains
with JEST unchanged (see ``tests/core/test_contract.py`` for a minimal one that is not open_clip).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from composer_jest.core.batch import Features

__all__ = ['ScoringModel', 'scoring_model']


@runtime_checkable
class ScoringModel(Protocol):
    """The learner as JEST scores it.

    Attributes:
        loss_name: the loss spec the model trains with (a registered name such as ``'sigmoid'`` | ``'softmax'``,
            or ``{'name': ..., <parameters>}``, see :func:`composer_jest.core.objectives.build_objective`); JEST scores
            with it unless given ``loss=``.
        spec: the architecture (e.g. an open_clip model name or config) a bare reference checkpoint path is
            loaded into, or ``None`` (then the reference must be given as a module or ``{model, checkpoint}``).
    """

    loss_name: Any
    spec: Any

    def score_features(self, batch: dict, patch_size: Optional[int] = None) -> Features:
        """Features of every example of ``batch`` for scoring: L2-normalised ``image_features`` and
        ``text_features`` ``[N, d]``, ``logit_scale`` (the scale itself) and ``logit_bias``.

        Eval semantics (no dropout, no multi-resolution split of the batch), the model's training mode restored
        afterwards; called under ``no_grad``/``inference_mode``. It must run through the model's own (possibly
        FSDP-wrapped) ``forward``, and return no tensor that aliases a parameter. ``patch_size`` asks for a
        coarser image encoding (FlexiViT scoring); ``None`` is the native one.
        """

    def check_scoring_patch_size(self, patch_size: Optional[int]) -> None:
        """Raise ``ValueError`` naming ``learner_patch_size`` and the valid values if it cannot be used."""

    def step_flops(self, **kwargs: Any) -> Optional[dict[str, float]]:
        """Analytic FLOPs of a JEST step (see :func:`composer_jest.models.flops.step_flops` for the keywords), or
        ``None`` when the model cannot estimate them."""


def scoring_model(model: Any) -> ScoringModel:
    """The learner behind Composer's ``state.model`` (unwrapping DDP), checked against :class:`ScoringModel`.

    Raises:
        TypeError: naming the members the model lacks.
    """
    inner = getattr(model, 'module', model)
    missing = [name for name in ('loss_name', 'spec', 'score_features', 'check_scoring_patch_size', 'step_flops')
               if not hasattr(inner, name)]
    if missing:
        raise TypeError(
            'JEST needs the learner to implement composer_jest.core.contract.ScoringModel; '
            f'{type(inner).__name__} lacks {missing}. Use composer_jest.CLIPModel, or add them to your ComposerModel '
            '(see ScoringModel).',
        )
    return inner
