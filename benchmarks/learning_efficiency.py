"""Learning-efficiency benchmark: does JEST reach a uniform baseline's accuracy with fewer examples and FLOPs?

One command trains every configuration of the table below on the heterogeneous Fashion-MNIST web pool
(:mod:`composer_jest.data.demo.fashion_web`) with Composer's ``Trainer`` and ``JEST`` exactly as a user would
(``algorithms=[JEST(...)], algorithm_passes=[jest_first]``), records learning curves against examples trained
on, examples seen and analytic FLOPs, and writes tables and plots under ``benchmarks/results/``.

Runs (same model, optimizer, schedule, number of trained examples, seed set):

- ``reference``: trained on the small clean curated set (its cost is reported separately, amortised);
- ``uniform``: the learner on the raw pool; ``oracle``: uniform over only the clean pairs of the pool;
- ``jest-0.5/0.8/0.9``: learnability, joint sampler; ``indep-0.8/0.9``: independent prioritisation;
- ``easyref-0.8`` / ``hardlearner-0.8``: other scores; ``jest-0.8-fast``: learner scored at patch 16 (flexi),
  cached reference embeddings in the batch, half of every trained batch at patch 16 (multi-resolution).

The pool, the curated set and the evaluation set are rendered once and cached as tensors (``--cache``), so a
run only indexes tensors. The text vocabulary is compacted to the words the benchmark uses (a lookup on
top of open_clip's ``SimpleTokenizer``): the 49408-row token embedding would otherwise dominate the
optimizer step of a tiny model on CPU.

Examples::

    python benchmarks/learning_efficiency.py                # the whole table (2 CPU cores: < 60 min); runs saved
                                                            # with the same settings are reused (resumable)
    python benchmarks/learning_efficiency.py --quick        # smoke test, a few minutes
    python benchmarks/learning_efficiency.py --analyse-only    # tables and plots from the saved runs
    python benchmarks/learning_efficiency.py --patch-size 4 --only uniform oracle jest-0.8-fast \
        --out benchmarks/results/patch4                     # image-heavy variant (64 image tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from composer import Trainer
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
from open_clip import SimpleTokenizer
from torch.utils.data import DataLoader, Dataset, RandomSampler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from composer_jest.core.batch import CACHED_REFERENCE_KEYS  # noqa: E402
from composer_jest.data.demo.fashion_mnist import WebNoise  # noqa: E402
from composer_jest.data.demo.fashion_web import (  # noqa: E402
    ZERO_SHOT_TEMPLATES,
    Attributes,
    FashionWebCaptions,
    LongTail,
    zero_shot_classnames,
)
from composer_jest.jest.algorithm import JEST, jest_first  # noqa: E402
from composer_jest.models.clip import CLIPModel  # noqa: E402
from composer_jest.models.flops import bucketed_text_flops, step_flops, vit_forward_flops  # noqa: E402
from composer_jest.models.text_buckets import caption_lengths, length_histogram  # noqa: E402

warnings.filterwarnings('ignore')
logging.getLogger('composer').setLevel(logging.ERROR)
log = logging.getLogger('learning_efficiency')

RESULTS = ROOT / 'benchmarks' / 'results'
KIND_CODES = {'clean': 0, 'mismatched': 1, 'junk': 2, 'near_duplicate': 3}


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything that defines the benchmark (frozen for all runs; tuned once on uniform)."""

    pool_size: int = 30000
    curated_size: int = 1500
    eval_size: int = 1000
    noise: dict = field(default_factory=lambda: dict(mismatched=0.25, junk=0.15, near_duplicate=0.15))
    long_tail: dict = field(default_factory=lambda: dict(rare_classes=(2, 4, 6, 9), rare_weight=0.1,
                                                         popular_per_class=8))
    # Inverted colours are off: at this budget they kept the tiny ViT's class accuracy near chance (see BENCHMARKS).
    attributes: dict = field(default_factory=lambda: dict(orientation=(0.5, 0.25, 0.25), small=0.25, second_item=0.4,
                                                          inverted=0.0, mention=0.9))
    width: int = 64
    layers: int = 2
    context_length: int = 32
    vocab_size: int = 512
    batch_size: int = 64
    steps: int = 600
    reference_steps: int = 800
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    eval_every: int = 50
    n_chunks: int = 16
    patch_size: int = 8  # native ViT patch on the 32 px images; flexi scoring and multi-res use twice this
    seeds: tuple = (0, 1, 2)
    data_seed: int = 0

    def key(self) -> str:
        data = {k: getattr(self, k) for k in ('pool_size', 'curated_size', 'eval_size', 'noise', 'long_tail',
                                                'attributes', 'context_length', 'vocab_size', 'data_seed')}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[:12]


QUICK = dict(pool_size=4000, curated_size=500, eval_size=300, steps=30, reference_steps=150, eval_every=10,
             batch_size=32,
             warmup=10, seeds=(0,), n_chunks=8)


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the table."""

    name: str
    kind: str  # 'uniform' | 'oracle' | 'jest'
    filter_ratio: float = 0.0
    score: str = 'learnability'
    selection: str = 'joint'
    fast: bool = False  # flexi scoring + cached reference + multi-resolution training
    n_seeds: int = 1
    flexi: bool = False  # the learner scores at 2x the native patch
    cached: bool = False  # reference embeddings precomputed into the batch
    multires: bool = False  # half of every trained batch at 2x the native patch
    temperature: float = 1.0  # sample ∝ exp(s(B) / temperature)
    loss: Any = 'sigmoid'  # the learner's loss spec (composer_jest.core.objectives); JEST scores with it

    @property
    def uses(self) -> tuple[bool, bool, bool]:
        """``(flexi, cached, multires)``."""
        return (self.fast or self.flexi, self.fast or self.cached, self.fast or self.multires)


# sigmoid with in-batch pairs whose reference images are this similar dropped from the negatives (score and loss)
FN_REFERENCE = {'name': 'sigmoid', 'false_negatives': {'threshold': 0.9, 'modality': 'image'}}
RUNS = (
    RunSpec('uniform', 'uniform', n_seeds=3),
    RunSpec('oracle', 'oracle', n_seeds=3),
    RunSpec('jest-0.8', 'jest', 0.8, n_seeds=3),
    RunSpec('indep-0.8', 'jest', 0.8, selection='independent', n_seeds=3),
    RunSpec('jest-0.5', 'jest', 0.5),
    RunSpec('jest-0.9', 'jest', 0.9, n_seeds=3),
    RunSpec('indep-0.9', 'jest', 0.9, selection='independent', n_seeds=3),
    RunSpec('jest-0.8-T0.25', 'jest', 0.8, temperature=0.25, n_seeds=3),
    RunSpec('easyref-0.8', 'jest', 0.8, score='easy_reference'),
    RunSpec('hardlearner-0.8', 'jest', 0.8, score='hard_learner'),
    RunSpec('jest-0.8-fast', 'jest', 0.8, fast=True, n_seeds=3),
    RunSpec('jest-0.8-cached', 'jest', 0.8, cached=True),
    RunSpec('jest-0.8-flexi-cached', 'jest', 0.8, flexi=True, cached=True, n_seeds=3),
    RunSpec('jest-0.8-cached-multires', 'jest', 0.8, cached=True, multires=True),
    # issue 16: other objectives and false-negative masking
    RunSpec('jest-0.8-softmax', 'jest', 0.8, loss='softmax', n_seeds=3),
    RunSpec('jest-0.8-dcl', 'jest', 0.8, loss='dcl', n_seeds=3),
    RunSpec('jest-0.8-fnref', 'jest', 0.8, loss=FN_REFERENCE, n_seeds=3),
    RunSpec('indep-0.8-softmax', 'jest', 0.8, selection='independent', loss='softmax', n_seeds=3),
    RunSpec('indep-0.8-dcl', 'jest', 0.8, selection='independent', loss='dcl', n_seeds=3),
    RunSpec('uniform-softmax', 'uniform', loss='softmax', n_seeds=3),
    RunSpec('uniform-dcl', 'uniform', loss='dcl', n_seeds=3),
)


# ---------------------------------------------------------------------------------------------------------------
# data: rendered once, cached as tensors
# ---------------------------------------------------------------------------------------------------------------
class CompactTokenizer:
    """open_clip's ``SimpleTokenizer`` followed by a lookup into a small vocabulary.

    Token ids are remapped to ``[0, vocab_size)``: padding stays 0, start-of-text is 1, end-of-text is the
    largest id (open_clip pools the text tower at the ``argmax`` token), the words in ``texts`` get the ids
    in between and anything else maps to one unknown id.
    """

    def __init__(self, texts: Sequence[str], context_length: int, vocab_size: int):
        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length, self.vocab_size = context_length, vocab_size
        ids = torch.unique(self.base(list(texts)))
        sot, eot = self.base.sot_token_id, self.base.eot_token_id
        words = [int(i) for i in ids.tolist() if i not in (0, sot, eot)]
        if len(words) + 4 > vocab_size:
            raise ValueError(f'{len(words)} distinct tokens do not fit a vocabulary of {vocab_size}')
        self.unknown = vocab_size - 2
        self.table = torch.full((len(self.base.encoder),), self.unknown, dtype=torch.long)
        self.table[0], self.table[sot], self.table[eot] = 0, 1, vocab_size - 1
        self.table[torch.tensor(words, dtype=torch.long)] = torch.arange(2, 2 + len(words))
        self.words = len(words)

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.table[self.base(list(texts))]


def _render(ds: FashionWebCaptions, with_canonical: bool = False) -> dict[str, Any]:
    n = len(ds)
    images = np.zeros((n, 32, 32), np.uint8)
    captions, canonical = [], []
    cols = {k: np.zeros(n, np.int64) for k in ('label', 'kind', 'rare', 'duplicate', 'clean')}
    for i in range(n):
        ex = ds.example(i)
        images[i] = np.asarray(ex['image'])
        captions.append(ex['caption'])
        canonical.append(ex['canonical'])
        cols['label'][i], cols['kind'][i] = ex['label'], KIND_CODES[ex['kind']]
        cols['rare'][i], cols['duplicate'][i], cols['clean'][i] = ex['rare'], ex['duplicate'], ex['clean']
    out = {'images': images, 'captions': captions, **cols}
    if with_canonical:
        out['canonical'] = canonical
    return out


def build_data(settings: Settings, cache: Path) -> dict[str, Any]:
    """Render pool, curated set and eval set once (cached under ``cache``), and tokenize them."""
    path = cache / f'fashion_web_{settings.key()}.pt'
    if path.is_file():
        data = torch.load(path, weights_only=False)
    else:
        t0 = time.time()
        seed = settings.data_seed
        attrs = Attributes(**settings.attributes)
        pool = FashionWebCaptions('train', num_samples=settings.pool_size, noise=WebNoise(**settings.noise),
                                  long_tail=LongTail(**{**settings.long_tail,
                                                        'rare_classes': tuple(settings.long_tail['rare_classes'])}),
                                  attributes=attrs, seed=seed)
        curated = FashionWebCaptions.curated(settings.curated_size, seed=seed + 1, attributes=attrs)
        evaluation = FashionWebCaptions.evaluation(settings.eval_size, seed=seed + 2, attributes=attrs)
        data = {'pool': _render(pool), 'curated': _render(curated), 'eval': _render(evaluation, True)}
        prompts = [t.format(name=n) for n in zero_shot_classnames() for t in ZERO_SHOT_TEMPLATES]
        universe = (data['pool']['captions'] + data['curated']['captions'] + data['eval']['captions']
                    + data['eval']['canonical'] + prompts)
        tok = CompactTokenizer(universe, settings.context_length, settings.vocab_size)
        for part in ('pool', 'curated', 'eval'):
            data[part]['text'] = tok(data[part]['captions'])
        data['eval']['canonical_text'] = tok(data['eval']['canonical'])
        data['universe'] = universe
        data['render_seconds'] = time.time() - t0
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    data['tokenizer'] = CompactTokenizer(data['universe'], settings.context_length, settings.vocab_size)
    return data


class TensorPool(Dataset):
    """Pre-rendered examples; ``__getitems__`` returns a whole batch dict (collate with :func:`_identity`)."""

    def __init__(self, part: dict[str, Any], subset: Optional[np.ndarray] = None,
                 reference: Optional[dict[str, torch.Tensor]] = None):
        self.images = torch.as_tensor(part['images'])
        self.text = part['text']
        self.cols = {k: torch.as_tensor(part[k]) for k in ('label', 'clean', 'rare', 'duplicate', 'kind')}
        self.subset = torch.as_tensor(subset if subset is not None else np.arange(len(self.images)))
        self.reference = reference

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, ids: Sequence[int]) -> dict:
        idx = self.subset[torch.as_tensor(ids)]
        images = self.images[idx].float().div_(127.5).sub_(1.0)[:, None].expand(-1, 3, -1, -1).contiguous()
        kind = self.cols['kind'][idx]
        batch = {
            'image': images, 'text': self.text[idx], 'label': self.cols['label'][idx], 'index': idx,
            'clean': self.cols['clean'][idx].float(), 'rare': self.cols['rare'][idx].float(),
            'duplicate': self.cols['duplicate'][idx].float(),
            'junk': (kind == KIND_CODES['junk']).float(), 'mismatched': (kind == KIND_CODES['mismatched']).float(),
        }
        if self.reference is not None:
            for key in CACHED_REFERENCE_KEYS:
                batch[key] = self.reference[key][idx]
        return batch


def _identity(batch: Any) -> Any:
    return batch


def make_loader(dataset: TensorPool, batch_size: int, seed: int) -> DataLoader:
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_identity,
                      num_workers=0)


# ---------------------------------------------------------------------------------------------------------------
# model, evaluation, curve recording
# ---------------------------------------------------------------------------------------------------------------
def model_config(s: Settings) -> dict:
    return dict(
        embed_dim=s.width,
        vision_cfg=dict(image_size=32, patch_size=s.patch_size, width=s.width, layers=s.layers, head_width=32),
        text_cfg=dict(context_length=s.context_length, vocab_size=s.vocab_size, width=s.width,
                      heads=max(1, s.width // 32), layers=s.layers),
        init_logit_bias=-10.0, init_logit_scale=math.log(10.0),
    )


def make_model(s: Settings, tokenizer: CompactTokenizer, seed: int, multires: bool = False,
               loss: Any = 'sigmoid') -> CLIPModel:
    torch.manual_seed(seed)  # benchmark script: the model init is the one global draw
    model = CLIPModel(model_config(s), loss=loss, classnames=zero_shot_classnames(),
                      class_templates=ZERO_SHOT_TEMPLATES,
                      low_res_fraction=0.5 if multires else 0.0,
                      low_res_patch_size=2 * s.patch_size if multires else None,
                      tokenizer=tokenizer)  # class prompts go through the same compact vocabulary
    return model


@torch.no_grad()
def evaluate(model: CLIPModel, data: dict[str, Any]) -> dict[str, float]:
    """Zero-shot accuracy (class prompts) and attribute-aware retrieval recall@1 on the rendered test split.

    Retrieval uses one canonical caption per test image naming all of its attributes; a retrieval counts as
    correct when the retrieved item has the same canonical caption (same class *and* attributes).
    """
    ev = data['eval']
    was_training = model.training
    model.eval()
    model._class_features = None
    try:
        images = torch.as_tensor(ev['images']).float().div_(127.5).sub_(1.0)[:, None].expand(-1, 3, -1, -1)
        out = model.towers(images.contiguous(), ev['canonical_text'])
        img, txt = out['image_features'], out['text_features']
        classes = model.class_features(img.device)
        zero_shot = float(((img @ classes.T).argmax(1) == torch.as_tensor(ev['label'])).float().mean())
        groups = {c: i for i, c in enumerate(dict.fromkeys(ev['canonical']))}
        gid = torch.tensor([groups[c] for c in ev['canonical']])
        sim = img @ txt.T
        i2t = float((gid[sim.argmax(1)] == gid).float().mean())
        t2i = float((gid[sim.argmax(0)] == gid).float().mean())
    finally:
        model._class_features = None
        model.train(was_training)
    return {'zero_shot': zero_shot, 'i2t_r1': i2t, 't2i_r1': t2i}


class CurveRecorder(LoggerDestination):
    """Accumulates examples and FLOPs from JEST's metrics (or a uniform step's) and evaluates every K steps."""

    TRACK = ('clean', 'rare', 'duplicate', 'junk', 'mismatched')

    def __init__(self, data: dict[str, Any], every: int, total: int, uniform_step_flops: Callable[[int], float],
                 batch_size: int):
        self.data, self.every, self.total = data, every, total
        self.uniform_step_flops, self.batch_size = uniform_step_flops, batch_size
        self.seen = self.trained = 0
        self.flops_train = self.flops_scoring = 0.0
        self.jest_active = False
        self.selected = {k: 0.0 for k in self.TRACK}
        self.superbatch = {k: 0.0 for k in self.TRACK}
        self.n_logged = 0
        self.curve: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if 'jest/examples_trained' not in metrics:
            return
        self.jest_active = True
        self.seen, self.trained = int(metrics['jest/examples_seen']), int(metrics['jest/examples_trained'])
        self.flops_train += float(metrics.get('jest/flops_train', 0.0))
        self.flops_scoring += float(metrics.get('jest/flops_scoring', 0.0))
        self.n_logged += 1
        for key in self.TRACK:
            self.selected[key] += float(metrics.get(f'jest/selected/{key}', 0.0))
            self.superbatch[key] += float(metrics.get(f'jest/superbatch/{key}', 0.0))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._record(state, 0)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.jest_active:  # uniform / oracle: every example seen is trained on
            self.seen += self.batch_size
            self.trained += self.batch_size
            self.flops_train += self.uniform_step_flops(text_counts(state.batch['text']))
        step = int(state.timestamp.batch)
        if step % self.every == 0 or step == self.total:
            self._record(state, step)

    def _record(self, state: State, step: int) -> None:
        metrics = evaluate(state.model, self.data)
        self.curve.append({'step': step, 'examples_trained': self.trained, 'examples_seen': self.seen,
                           'flops': self.flops_train + self.flops_scoring, 'flops_train': self.flops_train,
                           'flops_scoring': self.flops_scoring, **metrics})

    def selection_summary(self) -> dict[str, dict[str, float]]:
        if not self.n_logged:
            return {}
        return {'selected': {k: v / self.n_logged for k, v in self.selected.items()},
                'superbatch': {k: v / self.n_logged for k, v in self.superbatch.items()}}


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def _fit(model: CLIPModel, loader: DataLoader, s: Settings, steps: int, seed: int, algorithms: Sequence = (),
         recorder: Optional[CurveRecorder] = None) -> Trainer:
    optimizer = DecoupledAdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    trainer = Trainer(
        model=model, train_dataloader=loader, max_duration=f'{steps}ba', optimizers=optimizer,
        schedulers=ConstantWithWarmupScheduler(t_warmup=f'{s.warmup}ba'), seed=seed, progress_bar=False,
        log_to_console=False, loggers=[recorder] if recorder is not None else [], algorithms=list(algorithms),
        algorithm_passes=[jest_first] if algorithms else None, device='cpu', device_train_microbatch_size=s.batch_size,
    )
    trainer.fit()
    return trainer


def text_counts(text: torch.Tensor) -> tuple[int, ...]:
    """The batch's caption-length histogram: ``CLIPTowers`` encodes captions in length buckets by it."""
    return tuple(length_histogram(caption_lengths(text), text.shape[1]))


def uniform_step_flops(model: CLIPModel, b: int) -> Callable[[int], float]:
    """FLOPs of a plain step on ``b`` examples, by caption lengths (JEST's own accounting, no scoring)."""
    cache: dict[tuple[int, ...], float] = {}

    def flops(counts: tuple[int, ...]) -> float:
        if counts not in cache:
            cache[counts] = step_flops(model, superbatch=b, subbatch=b, image_size=32, uses_reference=False,
                                       uses_learner=False, text_length_counts=counts,
                                       text_buckets=model.towers.text_buckets,
                                       text_bucket_overhead=model.towers.text_bucket_overhead)['uniform_train']
        return cache[counts]

    return flops


def replayed_flops(flops: Callable[[int], float], dataset: TensorPool, batch_size: int, seed: int, steps: int) -> float:
    """Training FLOPs of ``steps`` batches drawn exactly as :func:`make_loader` draws them (same generator)."""
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    total, done = 0.0, 0
    while done < steps:  # one permutation per epoch; drop_last drops each epoch's remainder
        order = torch.as_tensor(list(iter(sampler)))
        for k in range(min(len(order) // batch_size, steps - done)):
            ids = dataset.subset[order[k * batch_size:(k + 1) * batch_size]]
            total += flops(text_counts(dataset.text[ids]))
            done += 1
    return total


def train_reference(s: Settings, data: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The reference: the same model and optimizer, trained on the curated set only (seed 0)."""
    patch = '' if s.patch_size == 8 else f'_p{s.patch_size}'
    path = cache / f'reference_{s.key()}_{s.reference_steps}_{s.lr}_{s.width}x{s.layers}_b{s.batch_size}{patch}.pt'
    model = make_model(s, data['tokenizer'], seed=1000)
    flops_step = uniform_step_flops(model, s.batch_size)
    t0 = time.time()
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        model.towers.load_state_dict(saved['towers'])
        curve = saved['curve']
    else:
        recorder = CurveRecorder(data, max(s.reference_steps // 10, 1), s.reference_steps, flops_step, s.batch_size)
        _fit(model, make_loader(TensorPool(data['curated']), s.batch_size, seed=1000), s, s.reference_steps, 1000,
             recorder=recorder)
        curve = recorder.curve
        torch.save({'towers': model.towers.state_dict(), 'curve': curve}, path)
    towers = model.frozen_copy()
    # Cached reference columns for the whole pool (float16 features, scalar scale / bias per example).
    pool = data['pool']
    feats = {'ref_image_features': [], 'ref_text_features': []}
    with torch.no_grad():
        for start in range(0, len(pool['images']), 1000):
            stop = start + 1000
            img = torch.as_tensor(pool['images'][start:stop]).float().div_(127.5).sub_(1.0)[:, None]
            out = towers(img.expand(-1, 3, -1, -1).contiguous(), pool['text'][start:stop])
            feats['ref_image_features'].append(out['image_features'].half())
            feats['ref_text_features'].append(out['text_features'].half())
        n = len(pool['images'])
        cached = {k: torch.cat(v) for k, v in feats.items()}
        cached['ref_logit_scale'] = out['logit_scale'].float().reshape(1).expand(n).clone()
        cached['ref_logit_bias'] = out['logit_bias'].float().reshape(1).expand(n).clone()
    clip = model.towers.clip
    embed_flops = sum(len(chunk) * vit_forward_flops(clip.visual, 32)
                      + bucketed_text_flops(clip, text_counts(chunk), towers.text_buckets, towers.text_bucket_overhead)
                      for chunk in pool['text'].split(1000))
    return {
        'towers': towers, 'cached': cached, 'curve': curve, 'final': curve[-1],
        'train_flops': replayed_flops(flops_step, TensorPool(data['curated']), s.batch_size, 1000, s.reference_steps),
        'embed_pool_flops': embed_flops,
        'train_examples': s.reference_steps * s.batch_size, 'seconds': time.time() - t0,
    }


def run_one(spec: RunSpec, seed: int, s: Settings, data: dict[str, Any], reference: dict[str, Any]) -> dict:
    """Train one configuration for one seed; returns its curve and summary."""
    b = s.batch_size
    pool = data['pool']
    subset = np.flatnonzero(pool['clean']) if spec.kind == 'oracle' else None
    flexi, cached, multires = spec.uses
    model = make_model(s, data['tokenizer'], seed=seed, multires=multires, loss=spec.loss)
    algorithms = []
    if spec.kind == 'jest':
        n = int(round(b / (1.0 - spec.filter_ratio)))
        ref = 'cached' if cached else reference['towers']
        if spec.score == 'hard_learner':
            ref = None
        algorithms.append(JEST(reference=ref, filter_ratio=spec.filter_ratio, n_chunks=s.n_chunks, score=spec.score,
                               selection=spec.selection, learner_patch_size=2 * s.patch_size if flexi else None,
                               temperature=spec.temperature, track_keys=CurveRecorder.TRACK, seed=seed))
    else:
        n = b
    dataset = TensorPool(pool, subset, reference['cached'] if cached else None)
    recorder = CurveRecorder(data, s.eval_every, s.steps, uniform_step_flops(model, b), b)
    t0 = time.time()
    _fit(model, make_loader(dataset, n, seed=seed), s, s.steps, seed, algorithms, recorder)
    return {
        'name': spec.name, 'seed': seed, 'spec': dataclasses.asdict(spec), 'superbatch': n, 'subbatch': b,
        'pool_size': len(dataset), 'pool_clean_fraction': float(np.mean(pool['clean'][dataset.subset.numpy()])),
        'curve': recorder.curve, 'selection': recorder.selection_summary(), 'seconds': time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------------------------
def smooth(values: Sequence[float], window: int = 3) -> np.ndarray:
    """Centred running mean (shrinking at the ends) to keep single noisy evaluations from deciding crossings."""
    v = np.asarray(values, float)
    out = np.empty_like(v)
    h = window // 2
    for i in range(len(v)):
        out[i] = v[max(0, i - h): i + h + 1].mean()
    return out


def crossing(x: Sequence[float], y: Sequence[float], target: float) -> Optional[float]:
    """First ``x`` where the (smoothed) curve reaches ``target`` (linear interpolation); ``None`` if never."""
    x, y = np.asarray(x, float), smooth(y)
    for i in range(len(y)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            frac = (target - y[i - 1]) / max(y[i] - y[i - 1], 1e-12)
            return float(x[i - 1] + frac * (x[i] - x[i - 1]))
    return None


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v)


def analyse(runs: dict[str, list[dict]], reference: dict[str, Any], metric: str = 'zero_shot') -> dict[str, Any]:
    """Examples-to-match, FLOPs-to-match and selection statistics per configuration."""
    uniform = runs['uniform']
    finals = [float(smooth([p[metric] for p in r['curve']])[-1]) for r in uniform]
    target = float(np.mean(finals))
    budget_examples = uniform[0]['curve'][-1]['examples_trained']
    budget_flops = float(np.mean([r['curve'][-1]['flops'] for r in uniform]))
    rows = {}
    for name, seeds in runs.items():
        per_seed = []
        for r in seeds:
            c = r['curve']
            y = [p[metric] for p in c]
            ex_t = crossing([p['examples_trained'] for p in c], y, target)
            ex_s = crossing([p['examples_seen'] for p in c], y, target)
            fl = crossing([p['flops'] for p in c], y, target)
            per_seed.append({
                'seed': r['seed'], 'final': float(smooth(y)[-1]),
                'final_i2t': float(smooth([p['i2t_r1'] for p in c])[-1]),
                'final_t2i': float(smooth([p['t2i_r1'] for p in c])[-1]),
                'examples_trained_to_match': ex_t, 'examples_seen_to_match': ex_s, 'flops_to_match': fl,
                'speedup_examples': budget_examples / ex_t if ex_t else None,
                'speedup_seen': budget_examples / ex_s if ex_s else None,
                'speedup_flops': budget_flops / fl if fl else None,
                'flops_total': c[-1]['flops'], 'seconds': r['seconds'],
                'selected_clean': r['selection'].get('selected', {}).get('clean'),
                'selected_rare': r['selection'].get('selected', {}).get('rare'),
                'selected_duplicate': r['selection'].get('selected', {}).get('duplicate'),
                'pool_clean': r['pool_clean_fraction'],
            })
        agg = {}
        for key in per_seed[0]:
            if key == 'seed':
                continue
            m, sd, k = _mean_std([p[key] for p in per_seed])
            agg[key] = {'mean': m, 'std': sd, 'n': k, 'of': len(per_seed)}
        rows[name] = {'seeds': per_seed, 'agg': agg, 'spec': seeds[0]['spec'], 'superbatch': seeds[0]['superbatch']}
    return {'metric': metric, 'target': target, 'uniform_finals': finals, 'budget_examples': budget_examples,
            'budget_flops': budget_flops, 'rows': rows,
            'reference': {'final': reference['final'], 'train_flops': reference['train_flops'],
                          'embed_pool_flops': reference['embed_pool_flops'],
                          'train_examples': reference['train_examples']}}


def _fmt(agg: dict, key: str, digits: int = 2, pct: bool = False) -> str:
    a = agg.get(key)
    if a is None or a['mean'] is None:
        return 'not reached'
    scale = 100.0 if pct else 1.0
    text = f"{a['mean'] * scale:.{digits}f}"
    if a['std'] is not None:
        text += f" ± {a['std'] * scale:.{digits}f}"
    if a['n'] < a['of']:
        text += f" ({a['n']}/{a['of']} reached)"
    return text


def table_markdown(res: dict[str, Any]) -> str:
    rows = res['rows']
    lines = [
        '| run | seeds | N | final zero-shot % | i2t R@1 % | t2i R@1 % | × fewer examples trained | × fewer seen '
        '| × fewer FLOPs | selected clean % | selected rare % | selected dup % |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for name, row in rows.items():
        a = row['agg']
        lines.append(
            f"| {name} | {len(row['seeds'])} | {row['superbatch']} | {_fmt(a, 'final', 1, True)} | "
            f"{_fmt(a, 'final_i2t', 1, True)} | {_fmt(a, 'final_t2i', 1, True)} | {_fmt(a, 'speedup_examples')} | "
            f"{_fmt(a, 'speedup_seen')} | {_fmt(a, 'speedup_flops')} | "
            f"{_fmt(a, 'selected_clean', 1, True) if a['selected_clean']['mean'] is not None else '–'} | "
            f"{_fmt(a, 'selected_rare', 1, True) if a['selected_rare']['mean'] is not None else '–'} | "
            f"{_fmt(a, 'selected_duplicate', 1, True) if a['selected_duplicate']['mean'] is not None else '–'} |")
    return '\n'.join(lines)


def _m(res: dict[str, Any], name: str, key: str) -> tuple[Optional[float], Optional[float]]:
    a = res['rows'].get(name, {}).get('agg', {}).get(key)
    return (a['mean'], a['std']) if a else (None, None)


def _joint_vs_independent(res: dict[str, Any], f: str) -> str:
    """Final zero-shot of joint vs independent selection, unpaired and paired by seed (same init and data order)."""
    fj, fj_sd = _m(res, f'jest-{f}', 'final')
    fi, fi_sd = _m(res, f'indep-{f}', 'final')
    if fj is None or fi is None:
        return f'- joint vs independent at f={f}: not run.'
    joint = {r['seed']: r['final'] for r in res['rows'][f'jest-{f}']['seeds']}
    indep = {r['seed']: r['final'] for r in res['rows'][f'indep-{f}']['seeds']}
    diffs = [joint[k] - indep[k] for k in sorted(joint.keys() & indep.keys())]
    paired = ''
    if len(diffs) > 1:
        paired = (f'; paired by seed {np.mean(diffs):+.1%} ± {np.std(diffs, ddof=1):.1%}, joint ahead in '
                  f'{sum(d > 0 for d in diffs)}/{len(diffs)} seeds')
    return (f'- joint vs independent at f={f}, final zero-shot: {fj:.1%} ± {fj_sd or 0:.1%} vs {fi:.1%} ± '
            f'{fi_sd or 0:.1%} (difference {fj - fi:+.1%}{paired}; goal: more than the seed spread).')


def goals_markdown(res: dict[str, Any]) -> str:
    """The issue's goals, computed from the table (``None`` where a run never reached the target)."""
    lines = []
    su_j, sd_j = _m(res, 'jest-0.8', 'speedup_examples')
    su_o, sd_o = _m(res, 'oracle', 'speedup_examples')
    if su_j and su_o:
        lines.append(f'- JEST f=0.8 vs oracle, speed-up in examples trained: {su_j:.2f}x vs {su_o:.2f}x -> captures '
                     f'{su_j / su_o:.0%} of the oracle\'s speed-up (excess over 1x: '
                     f'{(su_j - 1) / (su_o - 1) if su_o > 1 else float("nan"):.0%}); goal >= 90%.')
    else:
        lines.append(f'- JEST f=0.8 speed-up {su_j}, oracle {su_o}: at least one never reached the target.')
    su_f, _ = _m(res, 'jest-0.8-fast', 'speedup_flops')
    if su_f:
        lines.append(f'- JEST f=0.8 flexi + cached + multi-res needs {1 / su_f:.2f}x uniform\'s FLOPs to match it '
                     '(goal <= 0.5x).')
    else:
        lines.append('- JEST f=0.8 flexi + cached + multi-res never reached uniform\'s final accuracy '
                     '(goal <= 0.5x FLOPs).')
    for f in ('0.8', '0.9'):
        lines.append(_joint_vs_independent(res, f))
    ref = res['reference']
    lines.append(f"- reference (curated set, {ref['train_examples']} examples): zero-shot "
                 f"{ref['final']['zero_shot']:.1%}, i2t R@1 {ref['final']['i2t_r1']:.1%}; its training costs "
                 f"{ref['train_flops'] / res['budget_flops']:.2f}x one uniform run, embedding the pool once "
                 f"{ref['embed_pool_flops'] / res['budget_flops']:.2f}x (amortised, not in the FLOP columns).")
    return '\n'.join(lines)


def plot(runs: dict[str, list[dict]], res: dict[str, Any], out: Path, reference: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    files = []
    axes_spec = (('examples_trained', 'examples trained on'), ('examples_seen', 'examples seen (super-batches)'),
                 ('flops', 'FLOPs (training + scoring)'))
    groups = {
        'filter_ratio': ('uniform', 'oracle', 'jest-0.5', 'jest-0.8', 'jest-0.9', 'jest-0.8-fast'),
        'compute': ('uniform', 'oracle', 'jest-0.8', 'jest-0.8-cached', 'jest-0.8-flexi-cached',
                    'jest-0.8-cached-multires', 'jest-0.8-fast'),
        'ablations': ('uniform', 'oracle', 'jest-0.8', 'indep-0.8', 'indep-0.9', 'easyref-0.8', 'hardlearner-0.8'),
        'objectives': ('uniform', 'uniform-softmax', 'uniform-dcl', 'jest-0.8', 'jest-0.8-softmax', 'jest-0.8-dcl',
                       'jest-0.8-fnref', 'indep-0.8-softmax', 'indep-0.8-dcl'),
    }
    for group, names in groups.items():
        for metric, label in (('zero_shot', 'zero-shot accuracy'), ('i2t_r1', 'attribute-aware i2t R@1')):
            fig, axs = plt.subplots(1, 3, figsize=(16, 4.5))
            for ax, (xkey, xlabel) in zip(axs, axes_spec):
                for i, name in enumerate(n for n in names if n in runs):
                    curves = runs[name]
                    x = np.mean([[p[xkey] for p in r['curve']] for r in curves], 0)
                    ys = np.array([smooth([p[metric] for p in r['curve']]) for r in curves])
                    color = f'C{i}'
                    ax.plot(x, ys.mean(0), label=f'{name} ({len(curves)} seeds)', color=color)
                    if len(curves) > 1:
                        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2)
                if metric == 'zero_shot':
                    ax.axhline(res['target'], color='k', ls=':', lw=1, label="uniform's final")
                    ax.axhline(reference['final']['zero_shot'], color='grey', ls='--', lw=1, label='reference')
                ax.set_xscale('log' if xkey != 'examples_trained' else 'linear')
                ax.set_xlabel(xlabel)
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
            axs[0].legend(fontsize=7)
            fig.suptitle(f'{label} ({group}); smoothed over 3 evaluations, band = seed min–max')
            fig.tight_layout()
            path = out / f'learning_curves_{group}_{metric}.png'
            fig.savefig(path, dpi=80)
            plt.close(fig)
            files.append(path.name)
    return files


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def machine() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        name = next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except Exception:  # noqa: BLE001
        name = platform.processor() or 'unknown CPU'
    return f'{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads'


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='small pool, few steps, one seed (smoke test)')
    p.add_argument('--out', default=None, help='results folder (default benchmarks/results[/quick])')
    p.add_argument('--cache', default=os.environ.get('JEST_BENCH_CACHE', '/tmp/composer_jest_bench'))
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: robust on a shared 2-core box)')
    p.add_argument('--only', nargs='*', default=None, help='run only these configurations')
    p.add_argument('--steps', type=int, default=None)
    p.add_argument('--seeds', type=int, default=None, help='seeds for the multi-seed runs')
    p.add_argument('--patch-size', type=int, default=None,
                   help='native ViT patch (default 8: 16 tokens; 4: 64 tokens, an image-heavy model like B/16)')
    p.add_argument('--analyse-only', action='store_true', help='re-analyse saved runs')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    torch.set_num_threads(args.threads)

    s = Settings(**QUICK) if args.quick else Settings()
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        s.seeds = tuple(range(args.seeds))
    if args.patch_size:
        s.patch_size = args.patch_size
    out = Path(args.out) if args.out else RESULTS / ('quick' if args.quick else '')
    runs_dir = out / 'runs'
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    t_start = time.time()
    data = build_data(s, cache)
    log.info('data ready (%d pool, %d curated, %d eval; vocab %d words) in %.0fs', len(data['pool']['images']),
             len(data['curated']['images']), len(data['eval']['images']), data['tokenizer'].words,
             time.time() - t_start)
    reference = train_reference(s, data, cache)
    log.info('reference: %s', reference['final'])
    specs = [r for r in RUNS if args.only is None or r.name in args.only]
    runs: dict[str, list[dict]] = {}
    tag = hashlib.sha256(json.dumps(dataclasses.asdict(s), sort_keys=True, default=list).encode()).hexdigest()[:8]
    for spec in specs:
        for seed in s.seeds[:spec.n_seeds]:
            path = runs_dir / f'{spec.name}_seed{seed}.json'
            if path.is_file() and json.loads(path.read_text()).get('settings_tag') == tag:
                result = json.loads(path.read_text())
            elif args.analyse_only:
                continue
            else:
                result = run_one(spec, seed, s, data, reference)
                result['settings_tag'] = tag
                path.write_text(json.dumps(result))
                c = result['curve'][-1]
                log.info('%-16s seed %d: zero-shot %.3f i2t %.3f (%.0fs, elapsed %.0fs)', spec.name, seed,
                         c['zero_shot'], c['i2t_r1'], result['seconds'], time.time() - t_start)
            runs.setdefault(spec.name, []).append(result)
    if args.only is not None and not args.analyse_only:
        log.info('--only: runs saved; analyse them with --analyse-only')
        return {}
    res = analyse(runs, reference)
    res['settings'] = dataclasses.asdict(s)
    res['machine'] = machine()
    res['date'] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    res['wall_seconds'] = time.time() - t_start
    res['reference']['curve'] = reference['curve']
    res['plots'] = plot(runs, res, out, reference)
    res['markdown'] = table_markdown(res) + '\n\n' + goals_markdown(res)
    (out / 'learning_efficiency.json').write_text(json.dumps(res, indent=1, default=float))
    (out / 'learning_efficiency.md').write_text(res['markdown'] + '\n')
    print(res['markdown'])
    print(f"target (uniform final zero-shot) {res['target']:.4f}; reference {reference['final']}; "
          f"wall {res['wall_seconds']:.0f}s")
    return res


if __name__ == '__main__':
    main()
