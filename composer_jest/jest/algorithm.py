"""JEST as a Composer Algorithm: select a sub-batch of every super-batch before training on it."""

from __future__ import annotations

import logging
import time
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
    ENCODED_IMAGE_KEY,
    IMAGE_KEY,
    TEXT_KEY,
    check_train_batches,
    subbatch_size,
    subset_batch,
)
from composer_jest.core.contract import scoring_model
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import Features, all_finite, check_scope, check_settings, jest_select
from composer_jest.core.selection import SCORE_TERMS
from composer_jest.data.two_stage import FullResDecoder, scoring_patch_size
from composer_jest.jest.reference import ReferenceSpec
from composer_jest.jest.score_inputs import ScoreInputs
from composer_jest.models.flops import StepFlopMeter

log = logging.getLogger(__name__)

__all__ = ['JEST', 'jest_first', 'SCOPES']

SCOPES = ('local', 'global')
# Constructor arguments recorded in checkpoints; a resumed run whose settings differ is warned.
_SETTINGS = ('filter_ratio', 'n_chunks', 'score', 'selection', 'loss', 'learner_patch_size', 'scope', 'temperature',
             'seed')


class JEST(Algorithm):
    """Joint Example Selection (Evans et al. 2024) for contrastive image–text training.

    At ``AFTER_DATALOADER`` (once per super-batch, before microbatching) the super-batch of size
    ``N`` is scored by the learner (no grad, optionally at a coarser patch size) and by a frozen
    reference, and the sub-batch of size ``b = round(N * (1 - filter_ratio))`` is drawn with the joint
    sampler; ``state.batch`` becomes that sub-batch. Size the dataloader's batch as ``b / (1 - f)``.

    Args:
        reference: the frozen reference: an open_clip model / :class:`~composer_jest.models.clip.CLIPModel`,
            a checkpoint path (architecture defaults to the learner's), or
            ``{'model': name-or-config, 'checkpoint': path}``, ``{'model': name, 'pretrained': tag-or-file}``
            (open_clip's pretrained weights: a tag, downloaded when online, or a local weights file), or
            ``'cached'``: reference features are
            read from batch columns (``CACHED_REFERENCE_KEYS``) written by ``composer-jest embed-reference``;
            a batch that carries them never runs the reference either way (with a one-time warning when
            a live reference was given). Not needed for
            ``hard_learner``/``uniform``.
        filter_ratio: fraction ``f`` of the super-batch discarded, in ``[0, 1)``.
        n_chunks: chunks of the joint sampler (paper: 16).
        score: ``learnability`` | ``easy_reference`` | ``hard_learner`` | ``uniform``.
        selection: ``joint`` | ``independent`` (per-example prioritisation baseline).
        loss: the scoring loss spec (:func:`~composer_jest.core.objectives.build_objective`: ``sigmoid``, ``softmax``,
            ``dcl``, ``hcl``, ``triplet``, ``npair`` or ``{name: ..., <parameters>}``); ``None`` follows the
            model's ``loss_name``. Its ``false_negatives`` mask the scores (ids from a batch column, or the
            reference's similarity; a live reference's embeddings then travel with the sub-batch as
            ``ref_image_features``/``ref_text_features`` for the training loss's mask). ``scope='global'``
            takes every loss, but without false negatives or a negatives queue.
        learner_patch_size: score the learner at this patch size (FlexiViT); ``None`` = native.
        scope: ``local`` (each rank selects from its own super-batch) or ``global`` (one selection over all
            ranks' super-batches: each rank draws its quota of its own examples, scoring them against the
            chosen chunks all-gathered after each chunk; no rank builds an ``N x N`` matrix, see
            :mod:`composer_jest.core.scoring`).
        temperature: sample sub-batches ``∝ exp(s(B) / temperature)``.
        image_key, text_key: batch keys.
        track_keys: numeric batch keys whose mean over the super-batch and the selection is logged
            (e.g. a ``clean`` flag of synthetic data).
        seed: seed of the sampler's generator (offset per rank in ``local`` scope).
        fast_scoring: score under ``torch.inference_mode`` (no autograd bookkeeping at all; the features
            are inference tensors, used only by the sampler; an FSDP-wrapped learner scores under
            ``no_grad``) and, under ``amp_bf16``, hold the frozen live reference in bfloat16 and run it in
            bf16 end to end (its logit scale and bias stay float32); ``False``: the plain ``no_grad`` +
            autocast path. Scores agree within bf16 rounding.
        compile_scoring: ``torch.compile`` the learner's scoring forward (``True``, or a dict of
            ``torch.compile`` keyword arguments). Off by default: worth it for fixed super-batch shapes
            on a GPU; compilation takes a while on the first steps, and caption-length buckets
            (``CLIPTowers.text_buckets``) vary in size from step to step (dynamic shapes).
        compile_selection: ``torch.compile`` the selection after its one generator draw (scores, joint sampler,
            statistics; ``True``, or a dict of ``torch.compile`` keyword arguments). At a fixed super-batch size
            its shapes never change and it has no host sync, so ``{'mode': 'reduce-overhead'}`` can replay the
            whole draw as one CUDA graph instead of ~40 kernel launches per chunk. Same selection as eager. Off
            by default.
        full_res: two-stage decoding (:mod:`composer_jest.data.two_stage`): the loader yields low-resolution
            scoring images plus the encoded files (``image_bytes``); the learner scores the low-resolution images
            at the patch giving ``learner_patch_size``'s token grid, and only the selected examples are decoded at
            full resolution by this :class:`~composer_jest.data.two_stage.FullResDecoder` (its augmentation
            generator is checkpointed with the algorithm). Needs cached reference features when the score uses
            the reference.

    Logs (per step): ``jest/examples_seen`` and ``jest/examples_trained`` (cumulative, summed over
    ranks like Composer's sample count), ``jest/learnability_superbatch``/``_selected`` (with
    ``score='learnability'``, the only score that runs both models; the super-batch figure is estimated from
    each rank's own super-batch, see :mod:`composer_jest.core.scoring`),
    ``jest/scoring_time`` (s), ``jest/flops_scoring``/``_train`` (analytic, per rank) and
    ``jest/superbatch/<key>``/``jest/selected/<key>`` for each of ``track_keys``.

    Example:
        >>> from composer_jest import JEST, CLIPModel
        >>> reference = CLIPModel('jest-tiny')
        >>> jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=0)
        >>> # Trainer(model=CLIPModel('jest-tiny'), algorithms=[jest], ...)
    """

    def __init__(
        self,
        reference: Optional[ReferenceSpec] = None,
        filter_ratio: float = 0.8,
        n_chunks: int = 16,
        score: str = 'learnability',
        selection: str = 'joint',
        loss: Optional[str] = None,
        learner_patch_size: Optional[int] = None,
        scope: str = 'local',
        temperature: float = 1.0,
        image_key: str = IMAGE_KEY,
        text_key: str = TEXT_KEY,
        track_keys: Sequence[str] = (),
        seed: int = 0,
        fast_scoring: bool = True,
        compile_scoring: Union[bool, dict] = False,
        full_res: Optional[FullResDecoder] = None,
        compile_selection: Union[bool, dict] = False,
    ):
        check_settings(filter_ratio=filter_ratio, n_chunks=n_chunks, score=score, selection=selection, loss=loss,
                       temperature=temperature)
        if scope not in SCOPES:
            raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
        if scope == 'global' and loss is not None:
            check_scope(build_objective(loss), world_size=2)  # a loss global scope cannot score fails before fit
        if learner_patch_size is not None and (not isinstance(learner_patch_size, int) or learner_patch_size < 1):
            raise ValueError(f'learner_patch_size must be a positive int or None, got {learner_patch_size!r}')
        if 'reference' in dict(SCORE_TERMS[score]) and reference is None:
            raise ValueError(f"score={score!r} needs a reference model; pass reference=... (or score='hard_learner')")
        if isinstance(track_keys, str):  # a bare string would be split into its characters
            track_keys = (track_keys,)
        self._inputs = ScoreInputs(reference, score, learner_patch_size, fast_scoring, compile_scoring)
        if not isinstance(compile_selection, (bool, dict)):
            raise ValueError('compile_selection must be True, False or a dict of torch.compile kwargs, '
                             f'got {compile_selection!r}')
        self._compile_selection = (dict(compile_selection) if isinstance(compile_selection, dict)
                                   else {} if compile_selection else None)
        self.filter_ratio, self.n_chunks, self.score, self.selection = float(filter_ratio), n_chunks, score, selection
        self.loss, self.learner_patch_size, self.scope, self.temperature = loss, learner_patch_size, scope, temperature
        self.image_key, self.text_key, self.track_keys, self.seed = image_key, text_key, tuple(track_keys), seed
        if full_res is not None and not isinstance(full_res, FullResDecoder):
            raise ValueError(f'full_res must be a composer_jest.data.two_stage.FullResDecoder or None, '
                             f'got {full_res!r}')
        self.full_res = full_res
        self.generator: Optional[torch.Generator] = None
        self._objective = build_objective(loss) if loss is not None else None  # else: the model's, at fit start
        self._carry_reference = False
        self._pending_rng: Optional[torch.Tensor] = None
        self.examples_seen = 0
        self.examples_trained = 0
        self._flops = StepFlopMeter()

    @property
    def reference(self) -> Optional[torch.nn.Module]:
        """The live reference towers (``None`` until fit start for a bare checkpoint path, and for cached)."""
        return self._inputs.reference.towers

    @property
    def reference_spec(self) -> Optional[ReferenceSpec]:
        """The reference as given (module, path, dict, ``'cached'`` or ``None``)."""
        return self._inputs.reference.spec

    @property
    def uses_reference(self) -> bool:
        return self._inputs.uses_reference

    @property
    def uses_learner(self) -> bool:
        return self._inputs.uses_learner

    def subbatch_size(self, superbatch_size: int) -> int:
        """``b = round(N (1 - f))``, at least 1 (:func:`composer_jest.core.batch.subbatch_size`)."""
        return subbatch_size(superbatch_size, self.filter_ratio)

    # -- Composer hooks -----------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_DATALOADER)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        else:
            self._select(state, logger)

    def _fit_start(self, state: State) -> None:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self._rank_seed())
            if self._pending_rng is not None:
                self.generator.set_state(self._pending_rng)
                self._pending_rng = None
        if state.dataloader is not None:
            check_train_batches(state.dataloader, 'the train dataloader')
        model = scoring_model(state.model)
        self._inputs.prepare(state, model)
        if self.loss is None:
            self.loss = model.loss_name
        self._objective = build_objective(self.loss, 'JEST loss')
        if self.scope == 'global':
            check_scope(self._objective, dist.get_world_size())
        # the training loss's similarity mask reads the reference's embeddings of the trained examples
        trained = build_objective(model.loss_name, 'model loss').false_negatives
        self._carry_reference = trained is not None and trained.threshold is not None
        # The trained batch is the sub-batch: never split it further unless asked to.
        batch_size = getattr(state.dataloader, 'batch_size', None)
        mb = state.device_train_microbatch_size
        if batch_size is not None and isinstance(mb, int) and mb > self.subbatch_size(batch_size):
            state.device_train_microbatch_size = self.subbatch_size(batch_size)

    def _rank_seed(self) -> int:
        if self.scope == 'global':
            return self.seed  # every rank must draw the same global selection
        return int(np.random.SeedSequence([self.seed, dist.get_global_rank()]).generate_state(1)[0])

    def _features(self, state: State, batch: dict) -> tuple[Optional[Features], Optional[Features]]:
        patch = self._two_stage_patch(batch) if ENCODED_IMAGE_KEY in batch else None
        return self._inputs(state, batch, self.image_key, self.text_key, patch_size=patch)

    def _two_stage_patch(self, batch: dict) -> Optional[int]:
        """The patch at which the low-resolution images of a two-stage batch give the token grid of
        ``learner_patch_size`` on full-resolution ones: ``p_learner * S_low / S``."""
        if self.full_res is None:
            raise ValueError(f'the batch carries {ENCODED_IMAGE_KEY!r} (two-stage decoding) but JEST has no full_res '
                             'decoder: set train_loader.two_stage in the config, or pass JEST(full_res=...)')
        if self.uses_reference and not all(k in batch for k in CACHED_REFERENCE_KEYS):
            raise ValueError(f'two-stage decoding gives the scorers low-resolution images: score={self.score!r} needs '
                             'cached reference features (`composer-jest embed-reference`, reference: cached)')
        return scoring_patch_size(self.learner_patch_size, batch[self.image_key].shape[-1],
                                  self.full_res.image_size)

    def _select(self, state: State, logger: Logger) -> None:
        state.batch = state.device.batch_to_device(state.batch)
        batch = state.batch
        if self.full_res is not None and ENCODED_IMAGE_KEY not in batch:
            raise ValueError(f'JEST has a full_res decoder but the batch has no {ENCODED_IMAGE_KEY!r} column: build '
                             'the loader with two-stage decoding (train_loader.two_stage)')
        n = batch[self.image_key].shape[0]
        b = self.subbatch_size(n)
        start = time.perf_counter()
        learner, reference = self._features(state, batch)
        # Global scope: every rank scores only its own candidates against all-gathered chosen chunks.
        rank, world = (dist.get_global_rank(), dist.get_world_size()) if self.scope == 'global' else (0, 1)
        # One device-side flag for NaN/inf in any score input, read after the step's single sync below: the
        # sampler itself never syncs, and top-k over NaN would draw silently.
        finite = all_finite(learner, reference)
        selected = jest_select(
            learner, reference, b, score=self.score, selection=self.selection, loss=self.loss,
            n_chunks=self.n_chunks, generator=self.generator, temperature=self.temperature,
            rank=rank, world_size=world, all_gather=dist.all_gather, mask=self._false_negatives(batch, reference),
            compile=self._compile_selection,
        )
        if self._carry_reference and reference is not None and CACHED_REFERENCE_KEYS[0] not in batch:
            batch.update(zip(CACHED_REFERENCE_KEYS[:2], (reference['image_features'], reference['text_features'])))
        self.last_global_indices = selected.global_indices.clone()  # a CUDA graph's output is rewritten next step
        # Keep the loader's (random) order: draw order is biased (early chunks favour high diagonal scores),
        # and multi-resolution training encodes the first part of the batch at low resolution.
        local = selected.indices.sort().values
        if local.device.type == 'cuda':
            torch.cuda.synchronize()
        scoring_time = time.perf_counter() - start
        if not bool(finite):
            self._inputs.name_non_finite(batch, self.image_key, learner, reference, int(state.timestamp.batch))
        metrics = {f'jest/{k}': float(v) for k, v in selected.stats.items()}
        state.batch = subset_batch(batch, local, n)
        if self.full_res is not None:  # stage 2: only the selected examples, at full resolution
            state.batch[self.image_key] = self.full_res(state.batch.pop(ENCODED_IMAGE_KEY))
            state.batch = state.device.batch_to_device(state.batch)
        metrics.update(self._flops.metrics(
            scoring_model(state.model), state.batch[self.image_key], batch[self.text_key], n, b,
            reference_cached=all(k in batch for k in CACHED_REFERENCE_KEYS), learner_patch_size=self.learner_patch_size,
            reference_clip=self.reference, uses_reference=self.uses_reference, uses_learner=self.uses_learner))
        for key in self.track_keys:
            if key not in batch:
                raise KeyError(f'track_keys: {key!r} is not a batch key (the batch has {sorted(batch)}); write it into '
                               f'the shards with `composer-jest convert folder|webdataset --keep-columns {key}`')
            values = torch.as_tensor(batch[key]).float()
            metrics[f'jest/superbatch/{key}'] = float(values.mean())
            metrics[f'jest/selected/{key}'] = float(values[local.to(values.device)].mean())
        self.last_indices = local
        self.examples_seen += n
        self.examples_trained += local.numel()
        metrics.update({
            # per-rank counters (checkpointed per rank); every rank has the same batch sizes
            'jest/examples_seen': self.examples_seen * dist.get_world_size(),
            'jest/examples_trained': self.examples_trained * dist.get_world_size(),
            'jest/scoring_time': scoring_time,
        })
        logger.log_metrics(metrics)

    def _false_negatives(self, batch: dict, reference: Optional[Features]) -> Optional[torch.Tensor]:
        """``[N, N]`` false negatives of the super-batch under the scoring loss, or ``None``."""
        fn = self._objective.false_negatives
        if fn is None:
            return None
        device = batch[self.image_key].device
        return fn.mask(fn.signature(batch, reference).to(device))

    # -- checkpointing ------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The selection settings a checkpoint records (a resumed run warns if its own differ)."""
        return {name: getattr(self, name) for name in _SETTINGS}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(examples_seen=self.examples_seen, examples_trained=self.examples_trained, settings=self.settings())
        if self.generator is not None:
            sd['rng'] = self.generator.get_state()
        if self.full_res is not None:
            sd['full_res'] = self.full_res.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, now = state.get('settings', {}), self.settings()
        changed = [f'{k}: {saved[k]!r} -> {now[k]!r}' for k in _SETTINGS
                   if k in saved and now[k] is not None and saved[k] != now[k]]
        if changed:
            warnings.warn('resuming JEST with settings that differ from the checkpoint\'s (checkpoint -> now): '
                          + '; '.join(changed) + '. The run continues with the new settings.', UserWarning,
                          stacklevel=2)
        self.examples_seen = state.get('examples_seen', 0)
        self.examples_trained = state.get('examples_trained', 0)
        if self.full_res is not None and 'full_res' in state:
            self.full_res.load_state_dict(state['full_res'])
        if 'rng' in state:
            if self.generator is not None:
                self.generator.set_state(state['rng'])
            else:
                self._pending_rng = state['rng']


def jest_first(algorithms: Sequence[Algorithm], event: Event) -> Sequence[Algorithm]:
    """Algorithm pass: JEST runs before every other algorithm, on every event.

    Composer's default ``set_filo_order`` pass reverses the order on ``AFTER_*`` events, which would run
    other ``AFTER_DATALOADER`` algorithms on the whole super-batch before selection. Pass it as
    ``Trainer(algorithm_passes=[jest_first])``.
    """
    return sort_to_front(algorithms, JEST)




