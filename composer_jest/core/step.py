"""One selection step as a plain function: a super-batch, the features it is scored with and a generator in; the
selected indices and the statistics out. No Composer ``State``: :class:`~composer_jest.jest.algorithm.JEST` is the
adapter that calls :func:`select_step` at ``AFTER_DATALOADER``; benchmarks and users call it directly.

The step, for a super-batch of ``N`` examples and filter ratio ``f``:

1. ``b = round(N (1 - f))`` (:func:`~composer_jest.core.batch.subbatch_size`);
2. learner and reference :class:`~composer_jest.core.batch.Features` (given, or computed by the callables passed:
   e.g. the learner's ``score_features`` through :class:`~composer_jest.core.contract.ScoringModel`);
3. the scoring loss's false-negative mask ``[N, N]``, if it has one
   (:class:`~composer_jest.core.objectives.FalseNegatives`);
4. the draw: :func:`~composer_jest.core.scoring.jest_select` (``∝ exp(s(B) / temperature)``, chunk by chunk; at
   ``scope='global'`` one draw over every rank's super-batch);
5. statistics: the learnability of the super-batch and of the selection, and the mean of each tracked batch
   column over both.

It draws exactly one value from ``generator`` (:func:`~composer_jest.core.selection.draw_seed`) and syncs the host
once, after the draw (the indices, the finite-ness flag and the statistics are read together).

Example:
    >>> import torch, torch.nn.functional as F
    >>> f = lambda: {'image_features': F.normalize(torch.randn(8, 4), dim=-1),
    ...              'text_features': F.normalize(torch.randn(8, 4), dim=-1),
    ...              'logit_scale': torch.tensor(10.), 'logit_bias': torch.tensor(-10.)}
    >>> settings = SelectionSettings(filter_ratio=0.5, n_chunks=2, loss='sigmoid')
    >>> step = select_step({'clean': torch.ones(8)}, settings, torch.Generator().manual_seed(0), learner=f(),
    ...                    reference=f(), track_keys=('clean',))
    >>> step.indices.shape, sorted(step.stats)
    (torch.Size([4]), ['learnability_selected', 'learnability_superbatch', 'selected/clean', 'superbatch/clean'])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch

from composer_jest.core.batch import IMAGE_KEY, Features, check_filter_ratio, subbatch_size
from composer_jest.core.objectives import Objective, build_objective
from composer_jest.core.scoring import AllGather, check_scope, jest_select
from composer_jest.core.selection import SCORE_METHODS, SELECTION_METHODS

__all__ = ['SCOPES', 'SelectionSettings', 'Step', 'FeatureSource', 'select_step', 'compile_options',
           'false_negative_mask', 'track_statistics', 'all_finite', 'check_finite']

SCOPES = ('local', 'global')

FeatureSource = Union[Features, Callable[[Mapping[str, Any]], Features]]
"""A model's features of the super-batch: given (e.g. cached columns), or a callable ``batch -> Features``."""


@dataclass
class SelectionSettings:
    """What a selection step draws with; checked on construction (errors name the setting and its accepted values).

    Args:
        filter_ratio: fraction ``f`` of the super-batch discarded, in ``[0, 1)``; the step trains on
            ``b = round(N (1 - f))``, so the loader yields ``N = b / (1 - f)``
            (:func:`~composer_jest.core.batch.superbatch_size`).
        n_chunks: chunks of the joint sampler (paper: 16).
        score: ``learnability`` | ``easy_reference`` | ``hard_learner`` | ``uniform``
            (:data:`~composer_jest.core.selection.SCORE_TERMS`).
        selection: ``joint`` | ``independent`` (per-example prioritisation baseline).
        loss: the scoring loss spec (:func:`~composer_jest.core.objectives.build_objective`: ``sigmoid``,
            ``softmax``, ``dcl``, ``hcl``, ``triplet``, ``npair`` or ``{name: ..., <parameters>}``); ``None`` until
            resolved (JEST follows the model's ``loss_name``). Its ``false_negatives`` mask the scores.
        temperature: sample sub-batches ``∝ exp(s(B) / temperature)``.
        scope: ``local`` (each rank selects from its own super-batch) or ``global`` (one selection over all
            ranks' super-batches; every loss, but without false negatives or a negatives queue).
        compile: ``torch.compile`` keyword arguments for the draw after its one generator value (``{}``: the
            defaults; ``{'mode': 'reduce-overhead'}``: one CUDA graph), or ``None``: eager. The same draw either way.
    """

    filter_ratio: float = 0.8
    n_chunks: int = 16
    score: str = 'learnability'
    selection: str = 'joint'
    loss: Optional[Any] = None
    temperature: float = 1.0
    scope: str = 'local'
    compile: Optional[dict] = None

    def __post_init__(self):
        check_filter_ratio(self.filter_ratio)
        self.filter_ratio = float(self.filter_ratio)
        if isinstance(self.n_chunks, bool) or not isinstance(self.n_chunks, int) or self.n_chunks < 1:
            raise ValueError(f'n_chunks must be an int >= 1, got {self.n_chunks!r}')
        for name, allowed in (('score', SCORE_METHODS), ('selection', SELECTION_METHODS), ('scope', SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {getattr(self, name)!r}')
        if self.loss is not None:
            objective = build_objective(self.loss, 'loss')  # names the registered losses and their parameters
            if self.scope == 'global':
                check_scope(objective, world_size=2)  # a loss global scope cannot score fails before fit
        temperature = self.temperature
        if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0
                                                 and math.isfinite(temperature)):
            raise ValueError(f'temperature must be a finite float > 0, got {temperature!r}')
        if self.compile is not None and not isinstance(self.compile, dict):
            raise ValueError(f'compile must be a dict of torch.compile kwargs or None, got {self.compile!r}')

    def subbatch_size(self, superbatch: int) -> int:
        """``b = round(N (1 - f))``, at least 1."""
        return subbatch_size(superbatch, self.filter_ratio)

    def objective(self) -> Objective:
        """The scoring loss, built (raises when ``loss`` is still ``None``)."""
        if self.loss is None:
            raise ValueError('SelectionSettings.loss is None: give the scoring loss (JEST takes the model\'s)')
        return build_objective(self.loss, 'loss')


class Step(NamedTuple):
    """What :func:`select_step` returns."""

    indices: torch.Tensor  # this rank's picks, sorted: the loader's order (draw order favours high diagonal scores)
    global_indices: torch.Tensor  # every rank's picks as rank * N + position, in draw order (a copy)
    stats: dict[str, float]  # learnability_superbatch / _selected (both models), superbatch/<key>, selected/<key>
    num_items: int  # N, the super-batch size
    learner: Optional[Features]
    reference: Optional[Features]
    seconds: float  # wall time of features + draw + the one host sync


def compile_options(value: Union[bool, dict], name: str) -> Optional[dict]:
    """A ``compile_*`` flag as ``torch.compile`` kwargs: ``True`` -> ``{}``, ``False`` -> ``None``, a dict as is.

    The one check of every compile flag (``compile_selection``, ``compile_scoring``).

    Example:
        >>> compile_options(True, 'compile_selection'), compile_options({'mode': 'max-autotune'}, 'x')
        ({}, {'mode': 'max-autotune'})
    """
    if not isinstance(value, (bool, dict)):
        raise ValueError(f'{name} must be True, False or a dict of torch.compile kwargs, got {value!r}')
    return dict(value) if isinstance(value, dict) else {} if value else None


def _features(source: Optional[FeatureSource], batch: Mapping[str, Any]) -> Optional[Features]:
    return source(batch) if callable(source) else source


def _uniform_features(n: int, device: torch.device) -> Features:
    """Placeholder features of a score that runs no model (``uniform``): they only give ``N``."""
    zeros = torch.zeros(n, 1, device=device)
    return dict(image_features=zeros, text_features=zeros, logit_scale=torch.ones((), device=device),
                logit_bias=torch.zeros((), device=device))


def false_negative_mask(objective: Objective, batch: Mapping[str, Any], reference: Optional[Features],
                        device: torch.device) -> Optional[torch.Tensor]:
    """``[N, N]`` bool: pairs of the super-batch that are not negatives under ``objective``, or ``None``."""
    fn = objective.false_negatives
    if fn is None:
        return None
    return fn.mask(fn.signature(batch, reference).to(device))


def track_statistics(batch: Mapping[str, Any], indices: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
    """``superbatch/<key>`` and ``selected/<key>``: the mean of each numeric batch column over both."""
    stats = {}
    for key in keys:
        if key not in batch:
            raise KeyError(f'track_keys: {key!r} is not a batch key (the batch has {sorted(batch)}); write it into '
                           f'the shards with `composer-jest convert folder|webdataset --keep-columns {key}`')
        values = torch.as_tensor(batch[key]).float()
        stats[f'superbatch/{key}'] = float(values.mean())
        stats[f'selected/{key}'] = float(values[indices.to(values.device)].mean())
    return stats


def select_step(
    batch: Mapping[str, Any],
    settings: SelectionSettings,
    generator: torch.Generator,
    *,
    learner: Optional[FeatureSource] = None,
    reference: Optional[FeatureSource] = None,
    image_key: str = IMAGE_KEY,
    track_keys: Sequence[str] = (),
    rank: int = 0,
    world_size: int = 1,
    all_gather: Optional[AllGather] = None,
    on_non_finite: Optional[Callable[[Optional[Features], Optional[Features]], None]] = None,
) -> Step:
    """Select ``b = round(N (1 - f))`` of the super-batch ``batch`` (see the module docstring for the steps).

    Args:
        batch: the super-batch (read for ``N`` when no model scores it, false-negative ids and ``track_keys``).
        settings: :class:`SelectionSettings` with a resolved ``loss``.
        generator: the seeded CPU generator; one value is drawn (at ``scope='global'``: in the same state on every
            rank).
        learner, reference: :data:`FeatureSource` of each model the score uses (``None``: not used).
        rank, world_size, all_gather: the ranks selecting together at ``scope='global'`` (ignored at ``local``).
        on_non_finite: called with the features when any holds NaN/inf (it should raise, naming the source);
            default: :func:`check_finite` on each.
    """
    start = time.perf_counter()
    learner, reference = _features(learner, batch), _features(reference, batch)
    if learner is None and reference is None:
        learner = _uniform_features(batch[image_key].shape[0], batch[image_key].device)
    anchor = (learner or reference)['image_features']
    n, objective = anchor.shape[0], settings.objective()
    if settings.scope == 'local':
        rank, world_size = 0, 1
    finite = all_finite(learner, reference)  # one device flag, read at the step's single sync below
    selected = jest_select(
        learner, reference, settings.subbatch_size(n), score=settings.score, selection=settings.selection,
        loss=settings.loss, n_chunks=settings.n_chunks, generator=generator, temperature=settings.temperature,
        rank=rank, world_size=world_size, all_gather=all_gather, compile=settings.compile,
        mask=false_negative_mask(objective, batch, reference, anchor.device))
    global_indices = selected.global_indices.clone()  # a CUDA graph's output is rewritten by the next call
    indices = selected.indices.sort().values
    if indices.device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not bool(finite):
        (on_non_finite or _raise_non_finite)(learner, reference)
    stats = {k: float(v) for k, v in selected.stats.items()}
    stats.update(track_statistics(batch, indices, track_keys))
    return Step(indices, global_indices, stats, n, learner, reference, seconds)


def _raise_non_finite(learner: Optional[Features], reference: Optional[Features]) -> None:
    check_finite(learner, 'learner features', step=-1)
    check_finite(reference, 'reference features', step=-1)


def all_finite(*features: Optional[Features]) -> torch.Tensor:
    """A device bool: no NaN/inf in any floating tensor of the given feature dicts (no host sync)."""
    flags = [torch.isfinite(v).all() for f in features if f is not None for v in f.values()
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else torch.tensor(True)


def check_finite(features: Optional[Features], source: str, step: int) -> None:
    """Raise :class:`FloatingPointError` naming ``source``, ``step`` and the keys if any tensor is NaN or inf."""
    if features is None:
        return
    bad = [k for k, v in features.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(
            f'non-finite values (NaN or inf) in {bad} from the {source} at step {step}: the scores cannot be '
            'computed. A learner that diverged needs a lower learning rate or gradient clipping; a reference or '
            'cached columns with NaN/inf need to be re-made (check the checkpoint / re-run embed-reference).',
        )
