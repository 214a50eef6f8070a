"""JEST beside Composer's own algorithms and a user's data: the checks that refuse a setup before the first step.

JEST replaces each super-batch of ``N`` examples with the ``b = round(N (1 - f))`` it selects, at
``AFTER_DATALOADER``, before Composer splits the batch into microbatches. What cannot work beside that fails here,
naming the conflict and the fix:

- at ``Event.INIT`` (:meth:`InteropChecks.init`): Composer algorithms that select examples themselves, that resize
  or rewrite the batch after JEST selects, that need ``(input, target)`` batches with class targets, or that
  replace the model JEST scores with (:data:`CONFLICTS`; what does combine is tabled in the README);
- at ``FIT_START`` (:meth:`InteropChecks.fit_start`): JEST's and the model's ``image_key``/``text_key`` that
  disagree, a loader that declares its batch keys (``dataset.batch_keys``) without them, and a loader batch
  ``N`` too small for the trained batch ``b`` the Trainer was given (``device_train_microbatch_size``):
  ``round(N (1 - f)) < b`` means the loader was sized at ``b`` rather than ``N = b / (1 - f)``;
- at the first ``AFTER_DATALOADER`` (:meth:`InteropChecks.first_batch`), before any scoring or forward: a batch
  that is not a dict, or lacks the keys, for loaders that do not declare them (and the super-batch size, for
  loaders without a ``batch_size``). Only the first batch of an epoch is sized: the final partial batch of an
  epoch (``drop_last=False``) trains ``round(n (1 - f))`` examples, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from composer.algorithms import (
    Alibi,
    ColOut,
    CutMix,
    CutOut,
    LabelSmoothing,
    MixUp,
    NoOpModel,
    ProgressiveResizing,
    SelectiveBackprop,
    SeqLengthWarmup,
)
from composer.core import Algorithm, State

from composer_jest.core.batch import loader_batch_keys, subbatch_size, superbatch_size

__all__ = ['CONFLICTS', 'InteropChecks', 'conflicts', 'settings_repr']

_FIXED_SIZE = 'the ViT learner and the reference take images of one fixed size (cheaper scoring: ' \
              'JEST(learner_patch_size=...); cheaper training: CLIPModel(low_res_fraction=...))'
_CLASS_TARGETS = 'a contrastive image-text batch is a dict with captions, not an (input, target) batch with class ' \
                 'targets'
#: Composer algorithms JEST refuses at ``Event.INIT``, and why.
CONFLICTS: dict[type, str] = {
    SelectiveBackprop: 'it is a second example selector: at AFTER_DATALOADER it drops examples by the learner\'s '
                       'loss, reading an (input, target) batch (batch[0], batch[1]) and calling the model on the '
                       'input alone, while JEST has already chosen the trained batch from the super-batch. For '
                       'loss-based selection use JEST(score=\'hard_learner\').',
    MixUp: f'it mixes the images of pairs of examples and interpolates their class targets (batch[0], batch[1]): '
           f'{_CLASS_TARGETS}, and a mixed image would keep one caption (a wrong pair).',
    CutMix: f'it pastes a patch of one image into another and interpolates their class targets (batch[0], '
            f'batch[1]): {_CLASS_TARGETS}, and a mixed image would keep one caption (a wrong pair).',
    LabelSmoothing: f'it smooths the class targets (batch[1]) of a classification loss: {_CLASS_TARGETS}; the '
                    f'contrastive loss has none.',
    ColOut: f'it drops rows and columns of the images (of the selected batch, after JEST, or in the dataset), '
            f'resizing them: {_FIXED_SIZE}.',
    ProgressiveResizing: f'it resizes the images of the batch (batch[0]) at AFTER_DATALOADER, after JEST has '
                         f'selected: {_FIXED_SIZE}.',
    Alibi: 'it rewrites the attention of a HuggingFace transformer and truncates the batch\'s sequences at '
           'AFTER_DATALOADER, after JEST has selected: the open_clip towers are no HuggingFace model and the text '
           'tower has a fixed context length.',
    SeqLengthWarmup: 'it truncates the batch\'s sequences (input_ids) at AFTER_DATALOADER, after JEST has '
                     'selected, and needs a HuggingFaceModel: the CLIP text tower has a fixed context length.',
    NoOpModel: 'it replaces the model with a no-op one, and JEST scores with the learner '
               '(composer_jest.core.contract.ScoringModel).',
}


def _registry_name(algorithm: Algorithm) -> str:
    """The yaml (registry) name of a Composer algorithm: its module's name, e.g. ``selective_backprop``."""
    return type(algorithm).__module__.rsplit('.', 1)[-1]


def conflicts(jest: Any, algorithms: list) -> list[str]:
    """One line per algorithm in ``algorithms`` that cannot run beside ``jest``: its yaml name, class and why.

    Example:
        >>> from composer.algorithms import EMA, MixUp
        >>> from composer_jest import JEST
        >>> jest = JEST(score='hard_learner')
        >>> found = conflicts(jest, [jest, EMA(), MixUp()])  # EMA combines; MixUp does not
        >>> len(found), found[0].split(': it ')[0]
        (1, 'MixUp (yaml: algorithms.mixup)')
    """
    out = []
    for algorithm in algorithms:
        if algorithm is jest:
            continue
        yaml = 'jest' if isinstance(algorithm, type(jest)) else _registry_name(algorithm)
        name = f'{type(algorithm).__name__} (yaml: algorithms.{yaml})'
        if isinstance(algorithm, type(jest)):
            out.append(f'{name}: a second JEST would select again from the first one\'s sub-batch.')
        elif isinstance(algorithm, CutOut) and algorithm.input_key != jest.image_key:
            out.append(f'{name}: it reads the images as batch[{algorithm.input_key!r}] ((input, target) batches); '
                       f'JEST\'s batches are dicts: pass CutOut(input_key={jest.image_key!r}) to cut holes in the '
                       'trained images.')
        else:
            reason = next((why for cls, why in CONFLICTS.items() if isinstance(algorithm, cls)), None)
            if reason is not None:
                out.append(f'{name}: {reason}')
    return out


def settings_repr(jest: Any) -> str:
    """``JEST(filter_ratio=..., ...)``: the settings a checkpoint entry and a log name JEST by (no memory address)."""
    spec = jest.reference_spec
    fields = {**jest.settings(), 'image_key': jest.image_key, 'text_key': jest.text_key}
    shown = ', '.join(f'{k}={v!r}' for k, v in fields.items())
    reference = f'<{type(spec).__name__}>' if isinstance(spec, torch.nn.Module) else repr(spec)
    return f'{type(jest).__name__}({shown}, reference={reference})'


class InteropChecks:
    """The checks one :class:`~composer_jest.jest.algorithm.JEST` runs at INIT, FIT_START and its first batch."""

    def __init__(self) -> None:
        self.trained_batch: Optional[int] = None  # device_train_microbatch_size as given to the Trainer
        self._batch_checked = False
        self._sized = False

    def init(self, jest: Any, state: State) -> None:
        """Refuse conflicting algorithms; remember the microbatch size the Trainer was given (``None``: default)."""
        found = conflicts(jest, list(state.algorithms))
        if found:
            raise ValueError('JEST cannot run beside ' + '; '.join(found) + ' Remove it from the algorithms '
                             '(README, "Combining with Composer", lists what combines).')
        mb = state.device_train_microbatch_size  # before the train loader is set: None unless given explicitly
        self.trained_batch = mb if isinstance(mb, int) and not getattr(state, 'auto_microbatching', False) else None

    def fit_start(self, jest: Any, state: State, model: Any) -> None:
        """Keys of JEST and the model, declared loader keys, and the loader's super-batch size."""
        self._batch_checked = self._sized = False  # each fit() may bring another loader
        model_keys = (getattr(model, 'image_key', None), getattr(model, 'text_key', None))
        if any(k is not None for k in model_keys) and model_keys != (jest.image_key, jest.text_key):
            raise ValueError(f'JEST and the model read different batch keys: {_settings(jest, model)}. Give both '
                             'the keys the batches carry.')
        declared = loader_batch_keys(state.dataloader)
        if declared is not None:
            self._check_keys(jest, model, declared, 'the train loader declares (dataset.batch_keys)')
            self._batch_checked = True
        batch_size = getattr(state.dataloader, 'batch_size', None)
        if isinstance(batch_size, int):
            self._check_superbatch(jest, batch_size, 'the train loader\'s batch_size')
            self._sized = True

    def first_batch(self, jest: Any, state: State) -> None:
        """The batch is a dict with JEST's keys (undeclared loaders) and, unsized so far, a full super-batch."""
        batch = state.batch
        if not self._batch_checked:
            model = getattr(state.model, 'module', state.model)
            if not isinstance(batch, Mapping):
                raise TypeError(f'JEST needs dict batches with image and text keys ({_settings(jest, model)}); the '
                                f'train loader yields a {type(batch).__name__}'
                                + (f' of {len(batch)} entries' if isinstance(batch, (list, tuple)) else '')
                                + '. Yield {image_key: images, text_key: tokens} per batch.')
            self._check_keys(jest, model, frozenset(batch), 'the first batch has')
            self._batch_checked = True
        if not self._sized and int(state.timestamp.batch_in_epoch) == 0:
            self._check_superbatch(jest, _num_samples(batch, jest.image_key), 'the first super-batch')
            self._sized = True

    @staticmethod
    def _check_keys(jest: Any, model: Any, keys: frozenset, where: str) -> None:
        missing = [k for k in (jest.image_key, jest.text_key) if k not in keys]
        if missing:
            raise ValueError(f'JEST reads batch key(s) {missing}, but {where} only {sorted(keys)}; '
                             f'{_settings(jest, model)}. Set image_key/text_key of JEST and of the model to the '
                             'batch\'s keys, or rename them in the data.')

    def _check_superbatch(self, jest: Any, n: int, what: str) -> None:
        """``round(n (1 - f)) >= b``: the super-batch yields the trained batch ``b`` the Trainer was given."""
        b, f = self.trained_batch, jest.filter_ratio
        if b is None or subbatch_size(n, f) >= b:
            return
        try:
            fix = f'N = superbatch_size({b}, {f}) = {superbatch_size(b, f)}'
        except ValueError as e:  # b / (1 - f) is not an integer: say which b or f would work
            fix = f'superbatch_size({b}, {f}) fails: {e}'
        raise ValueError(
            f'{what} is {n} examples, but device_train_microbatch_size={b} with filter_ratio={f} needs a super-batch '
            f'of N = b / (1 - f) = {b / (1 - f):g}: JEST would train {subbatch_size(n, f)} examples a step, not {b}. '
            f'Size the loader\'s batch with composer_jest.core.batch.superbatch_size (b={b}, f={f}): {fix}. If {n} is '
            f'the super-batch you meant, set device_train_microbatch_size to at most {subbatch_size(n, f)}, or leave '
            'it unset.')


def _settings(jest: Any, model: Any) -> str:
    mine = f'JEST(image_key={jest.image_key!r}, text_key={jest.text_key!r})'
    keys = (getattr(model, 'image_key', None), getattr(model, 'text_key', None))
    theirs = (f'{type(model).__name__}(image_key={keys[0]!r}, text_key={keys[1]!r})' if any(keys)
              else f'{type(model).__name__} (declares no image_key/text_key)')
    return f'{mine}, model {theirs}'


def _num_samples(batch: Mapping, image_key: str) -> int:
    return int(batch[image_key].shape[0])
