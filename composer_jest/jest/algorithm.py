"""JEST as a Composer Algorithm: select a sub-batch of every super-batch before training on it.

The selection itself is :func:`composer_jest.core.step.select_step` (no Composer); :class:`JEST` adapts it to
Composer's events: the reference and the generator at ``FIT_START``, the step and the ``state.batch`` swap at
``AFTER_DATALOADER``, logging, and its state in checkpoints.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.core.passes import sort_to_front
from composer.loggers import Logger
from composer.utils import dist

from composer_jest.core.batch import (
    CACHED_REFERENCE_KEYS,
    IMAGE_KEY,
    INDEX_KEY,
    TEXT_KEY,
    check_train_batches,
    subset_batch,
)
from composer_jest.core.contract import scoring_model
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import check_scope
from composer_jest.core.step import SCOPES, SelectionSettings, compile_options, select_step
from composer_jest.data.two_stage import FullResDecoder
from composer_jest.jest.full_res import check_full_res, decode_selected, two_stage_patch
from composer_jest.jest.interop import InteropChecks, settings_repr
from composer_jest.jest.reference import ReferenceSpec
from composer_jest.jest.resume_state import ResumeState
from composer_jest.jest.score_inputs import ScoreInputs
from composer_jest.models.flops import StepFlopMeter

log = logging.getLogger(__name__)

__all__ = ['JEST', 'jest_first', 'SCOPES']

# Constructor arguments recorded in checkpoints; a resumed run whose settings differ is warned.
_SETTINGS = ('filter_ratio', 'n_chunks', 'score', 'selection', 'loss', 'learner_patch_size', 'scope', 'temperature',
             'seed')


class _Setting:
    """A JEST attribute that is a field of its :class:`~composer_jest.core.step.SelectionSettings` (``config``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.config, self.name, value)


class JEST(Algorithm):
    """Joint Example Selection (Evans et al. 2024) for contrastive image–text training.

    At ``AFTER_DATALOADER`` (once per super-batch of ``N = b / (1 - f)``, before microbatching) the learner and a
    frozen reference score the super-batch and ``b = round(N (1 - filter_ratio))`` examples are drawn jointly
    (:func:`~composer_jest.core.step.select_step`); ``state.batch`` becomes them, in the loader's order.

    Args:
        reference: an open_clip model / ``CLIPModel``, a checkpoint path (the learner's architecture), ``{'model':
            ..., 'checkpoint' or 'pretrained': ...}``, or ``'cached'`` (the ``CACHED_REFERENCE_KEYS`` columns of
            ``composer-jest embed-reference``, used whenever a batch has them). Not needed by ``hard_learner``/
            ``uniform``. filter_ratio, n_chunks, score, selection, loss, scope, temperature: see
            :class:`~composer_jest.core.step.SelectionSettings` (``loss=None``: the model's ``loss_name``).
        learner_patch_size: score the learner at this patch size (FlexiViT); ``None`` = native. image_key,
            text_key: batch keys. track_keys: numeric batch keys whose mean over the super-batch and the selection
            is logged. seed: the sampler's seed (offset per rank in ``local`` scope). fast_scoring,
            compile_scoring: :class:`~composer_jest.jest.score_inputs.ScoreInputs`. compile_selection: compile the
            draw (same selection). full_res: two-stage decoding (:mod:`~composer_jest.jest.full_res`).

    Logs ``jest/examples_seen``/``_trained``, ``jest/learnability_superbatch``/``_selected``, ``jest/scoring_time``,
    ``jest/flops_scoring``/``_train`` and ``jest/superbatch/<key>``/``jest/selected/<key>`` per track key.

    Example:
        >>> from composer_jest import JEST, CLIPModel
        >>> jest = JEST(reference=CLIPModel('jest-tiny'), filter_ratio=0.5, n_chunks=4, seed=0)
        >>> # Trainer(model=..., algorithms=[jest], algorithm_passes=[jest_first], ...)
    """

    filter_ratio, n_chunks, score, selection, loss, scope, temperature = (_Setting() for _ in range(7))

    def __init__(self, reference: Optional[ReferenceSpec] = None,
                 filter_ratio: float = SelectionSettings.filter_ratio, n_chunks: int = 16,
                 score: str = 'learnability', selection: str = 'joint', loss: Optional[Any] = None,
                 learner_patch_size: Optional[int] = None, scope: str = 'local', temperature: float = 1.0,
                 image_key: str = IMAGE_KEY, text_key: str = TEXT_KEY, track_keys: Sequence[str] = (), seed: int = 0,
                 fast_scoring: bool = True, compile_scoring: Union[bool, dict] = False,
                 full_res: Optional[FullResDecoder] = None, compile_selection: Union[bool, dict] = False):
        self.config = SelectionSettings(filter_ratio, n_chunks, score, selection, loss, temperature, scope,
                                        compile_options(compile_selection, 'compile_selection'))
        self._inputs = ScoreInputs(reference, score, learner_patch_size, fast_scoring, compile_scoring)
        self.learner_patch_size, self.seed = learner_patch_size, seed
        self.image_key, self.text_key = image_key, text_key
        self.track_keys = (track_keys,) if isinstance(track_keys, str) else tuple(track_keys)  # not its characters
        self.full_res = check_full_res(full_res)
        self.generator: Optional[torch.Generator] = None
        self._pending_rng, self._carry_reference = None, False  # a loaded generator state until fit start
        self.examples_seen = self.examples_trained = 0  # global totals (summed over ranks)
        self._resume = ResumeState()  # the layout checkpoints record (composer_jest.jest.resume_state)
        self._flops = StepFlopMeter()
        self._interop = InteropChecks()  # conflicting algorithms, batch keys, a loader sized at b (jest/interop)

    def __repr__(self) -> str:
        return settings_repr(self)  # names the checkpoint entry and logs by the settings, not an address

    reference = property(lambda self: self._inputs.reference.towers,
                         doc='The live reference towers (``None`` until fit start for a checkpoint path, and cached).')
    reference_spec = property(lambda self: self._inputs.reference.spec, doc='The reference as given.')
    uses_reference = property(lambda self: self._inputs.uses_reference)
    uses_learner = property(lambda self: self._inputs.uses_learner)

    def subbatch_size(self, superbatch_size: int) -> int:
        """``b = round(N (1 - f))``, at least 1 (:func:`composer_jest.core.batch.subbatch_size`)."""
        return self.config.subbatch_size(superbatch_size)

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._interop.init(self, state)  # refuses algorithms that cannot run beside JEST
        elif event == Event.FIT_START:
            self._fit_start(state)
            self._interop.fit_start(self, state, scoring_model(state.model))
        else:
            self._interop.first_batch(self, state)  # keys and size of the first super-batch, before scoring
            self._select(state, logger)

    def _fit_start(self, state: State) -> None:
        if self.generator is None:
            self.generator, self._pending_rng = _generator(self.seed, self.scope == 'global', self._pending_rng), None
        if state.dataloader is not None:
            check_train_batches(state.dataloader, 'the train dataloader')
        self._resume.fit_start(state.dataloader, self.subbatch_size, self.filter_ratio)  # refuses another batch
        model = scoring_model(state.model)
        self._inputs.prepare(state, model)
        self.loss = model.loss_name if self.loss is None else self.loss
        objective = build_objective(self.loss, 'JEST loss')
        if self.scope == 'global':
            check_scope(objective, dist.get_world_size())
        self._carry_reference = _masks_by_reference(model.loss_name)
        _cap_microbatch(state, self.subbatch_size)

    def _select(self, state: State, logger: Logger) -> None:
        state.batch = batch = state.device.batch_to_device(state.batch)
        patch = two_stage_patch(self.full_res, batch, self.image_key, self.learner_patch_size, self.uses_reference,
                                self.score)
        learner, reference = self._inputs.scorers(state, self.image_key, self.text_key, patch)
        step = select_step(batch, self.config, self.generator, learner=learner, reference=reference,
                           image_key=self.image_key, track_keys=self.track_keys, rank=dist.get_global_rank(),
                           world_size=dist.get_world_size(), all_gather=dist.all_gather,
                           on_non_finite=lambda *f: self._inputs.name_non_finite(
                               batch, self.image_key, *f, int(state.timestamp.batch)))
        if self._carry_reference:
            _carry_reference(batch, step.reference)
        self.last_indices, self.last_global_indices = step.indices, step.global_indices
        state.batch = decode_selected(self.full_res, subset_batch(batch, step.indices, step.num_items),
                                      self.image_key, state.device)
        metrics = {f'jest/{k}': v for k, v in step.stats.items()}
        metrics.update(self._flops.metrics(scoring_model(state.model), state.batch[self.image_key],
                                           batch[self.text_key], step.num_items, step.indices.numel(),
                                           **self._inputs.flop_kwargs(batch)))
        self.last_superbatch_index = batch.get(INDEX_KEY)  # the super-batch's example ids (SelectionLog)
        self._resume.step(step.num_items, step.indices.numel(), self.filter_ratio)
        world = dist.get_world_size()  # global totals (checkpointed as such); every rank has the same sizes
        self.examples_seen += step.num_items * world
        self.examples_trained += step.indices.numel() * world
        logger.log_metrics({**metrics, 'jest/examples_seen': self.examples_seen,
                            'jest/examples_trained': self.examples_trained, 'jest/scoring_time': step.seconds})

    def settings(self) -> dict[str, Any]:
        """The selection settings a checkpoint records (a resumed run warns if its own differ; another filter ratio
        is refused at fit start)."""
        return {name: getattr(self, name) for name in _SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        """Settings, global counters, the layout, this rank's streams (``rng``, ``full_res``) and every rank's
        (``streams``, gathered: a collective at world size > 1, see :mod:`composer_jest.jest.resume_state`)."""
        sd = super().state_dict()
        stream = {}
        if self.generator is not None:
            stream['rng'] = self.generator.get_state()
        if self.full_res is not None:
            stream['full_res'] = self.full_res.state_dict()
        sd.update(stream, settings=self.settings())
        sd.update(self._resume.entries(self.examples_seen, self.examples_trained, stream))
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's stream and the global counters; another global batch or filter ratio is refused at fit
        start (:class:`~composer_jest.jest.resume_state.ResumeState`)."""
        _warn_changed_settings(state.get('settings', {}), self.settings())
        restored = self._resume.load(state, self.scope)
        self.examples_seen, self.examples_trained = restored.examples_seen, restored.examples_trained
        stream = restored.stream or {}
        if self.full_res is not None and 'full_res' in stream:
            self.full_res.load_state_dict(stream['full_res'])
        if 'rng' in stream and self.generator is not None:
            self.generator.set_state(stream['rng'])
        elif 'rng' in stream:
            self._pending_rng = stream['rng']


def _generator(seed: int, global_scope: bool, state: Optional[torch.Tensor]) -> torch.Generator:
    """The sampler's CPU generator: in ``state`` (a loaded checkpoint's) if given, else freshly seeded."""
    generator = torch.Generator().manual_seed(_rank_seed(seed, global_scope))
    return generator if state is None else generator.set_state(state)


def _rank_seed(seed: int, global_scope: bool) -> int:
    """The generator seed: ``seed`` itself at global scope (one draw for all ranks), else mixed with the rank."""
    if global_scope:
        return seed
    return int(np.random.SeedSequence([seed, dist.get_global_rank()]).generate_state(1)[0])


def _masks_by_reference(loss: Any) -> bool:
    """Whether the training loss masks false negatives by reference similarity (it then reads the reference's
    embeddings of the trained examples, :func:`_carry_reference`)."""
    trained = build_objective(loss, 'model loss').false_negatives
    return trained is not None and trained.threshold is not None


def _carry_reference(batch: dict, reference: Optional[dict]) -> None:
    """The reference's embeddings ride with the batch (``ref_image_features``/``ref_text_features``) for a training
    loss that masks false negatives by reference similarity, unless the batch already carries cached ones."""
    if reference is not None and CACHED_REFERENCE_KEYS[0] not in batch:
        batch.update(zip(CACHED_REFERENCE_KEYS[:2], (reference['image_features'], reference['text_features'])))


def _cap_microbatch(state: State, subbatch_size: Any) -> None:
    """The trained batch is the sub-batch: never split it further unless asked to."""
    batch_size = getattr(state.dataloader, 'batch_size', None)
    mb = state.device_train_microbatch_size
    if batch_size is not None and isinstance(mb, int) and mb > subbatch_size(batch_size):
        state.device_train_microbatch_size = subbatch_size(batch_size)


def _warn_changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> None:
    changed = [f'{k}: {saved[k]!r} -> {now[k]!r}' for k in _SETTINGS
               if k in saved and now[k] is not None and saved[k] != now[k]]
    if changed:
        warnings.warn('resuming JEST with settings that differ from the checkpoint\'s (checkpoint -> now): '
                      + '; '.join(changed) + '. The run continues with the new settings.', UserWarning, stacklevel=3)


def jest_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """Algorithm pass: JEST runs before every other algorithm, on every event.

    Composer's default ``set_filo_order`` pass reverses the order on ``AFTER_*`` events, which would run
    other ``AFTER_DATALOADER`` algorithms on the whole super-batch before selection. Pass it as
    ``Trainer(algorithm_passes=[jest_first])``.
    """
    return sort_to_front(algorithms, JEST)
