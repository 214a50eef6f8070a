"""Compute study (issue 26): does JEST save compute against uniform training and offline reference filtering?

Everything runs through the product as a user would: Composer's ``Trainer`` with ``JEST(...)`` for online selection,
and :mod:`composer_jest.core.filtering` (the score ``composer-jest filter`` uses) for offline filtering, on the
Fashion-web pools of :mod:`benchmarks.learning_efficiency` (whose data, loader, evaluation and curve recorder are
reused unchanged). Two models:

- ``proportional`` (shipped as ``jest-tiny-b16prop``): ViT-B/16's cost proportions at 32 px -- 65 image tokens at
  width 64 vs ~12 caption tokens at width 48 (:func:`proportions` compares the per-example FLOP ratios with
  ViT-B/16 at 224 px and 18-token captions, both from :mod:`composer_jest.models.flops`);
- ``benchmark``: today's benchmark model (16 image tokens, both towers width 64), a second row set.

Methods (same optimizer, constant-after-warmup schedule, batch ``b``):

- ``uniform``; ``oracle`` (uniform on the clean pairs only: an upper bound, not a method);
- ``offline-0.5`` / ``offline-0.2``: score every pool pair once with the reference (CLIP score,
  :func:`composer_jest.core.filtering.reference_scores`), keep the top 50% / 20%, train uniformly on them;
- ``jest-<f>-all``: JEST at filter ratio ``f`` with every saving (cached reference embeddings, learner scored at
  twice the patch (flexi), half of each trained batch at twice the patch (multi-resolution));
  ``jest-0.8-cached`` and ``jest-0.8-cached-flexi``: the savings one at a time;
- the reference in the loss (issue 30; the pool's cached reference columns, no extra forward pass): ``drrho`` (uniform
  batches, the DRRho steered loss), ``uniform-distill`` (SigLIP + λ = 1 distillation), ``jest-<f>-all-distill`` (JEST
  selection, trained with distillation), ``offline-0.5-distill`` (the offline filter, trained with distillation) and
  ``offline-0.5-then-jest-0.8-all`` (keep the top half of the pool by the reference, then JEST on it); their best
  two also on the noise pools.

Each run records zero-shot / retrieval against examples trained, analytic FLOPs (JEST's own ``jest/flops_*``
accounting; uniform steps by :func:`composer_jest.models.flops.step_flops`) and **process CPU time** of training
(evaluation excluded). Runs whose steps are cheaper than a uniform step run longer (same constant learning rate),
so every curve reaches uniform's FLOP budget and "accuracy at equal FLOPs" is read off the curve, never
extrapolated. The reference's training and the one-off pool embedding pass are measured (FLOPs and CPU seconds)
and reported both ways. Analysis and plots: :mod:`benchmarks.compute_study_analysis`.

Examples::

    python benchmarks/compute_study.py                  # the whole study, resumable (saved runs are reused)
    python benchmarks/compute_study.py --phases dev     # only the dev-pool table (seed 0 first, then 1, 2)
    python benchmarks/compute_study.py --phases steering  # the steered rows, then their best two on the noise pools
    python benchmarks/compute_study.py --quick --out /tmp/cs   # smoke test (< 1 min)
    python benchmarks/compute_study.py --analyse-only   # tables and plots from the saved runs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import learning_efficiency as le  # noqa: E402

from composer_jest.core.filtering import keep_indices, reference_scores  # noqa: E402
from composer_jest.data.demo.fashion_web import ZERO_SHOT_TEMPLATES, zero_shot_classnames  # noqa: E402
from composer_jest.jest.algorithm import JEST  # noqa: E402
from composer_jest.models.clip import CLIPModel, model_config_dir  # noqa: E402
from composer_jest.models.flops import bucketed_text_flops, step_flops, vit_forward_flops  # noqa: E402

log = logging.getLogger('compute_study')
RESULTS = ROOT / 'benchmarks' / 'results' / 'compute_study'

# ---------------------------------------------------------------------------------------------------------------
# what is run
# ---------------------------------------------------------------------------------------------------------------
# The dev pool is learning_efficiency's: 30000 pairs, 40% bad captions (25% mismatched, 15% junk), 15% near duplicates.
# The other pools are seeded sub-pools of it (no new rendering, the same reference and cached embeddings), all of
# SUBPOOL_SIZE pairs: ``bad`` = fraction of bad captions (drawn from the dev pool's mismatched + junk pairs, keeping
# their 5:3 mix), the rest from its good pairs (clean + near duplicates, 3:1).
SUBPOOL_SIZE = 17000
POOLS = {
    'dev': None,
    'bad10': 0.1,
    'bad70': 0.69,  # the dev pool has 11883 bad pairs: 69% of 17000 is the most it can give
    'dups': 0.0,  # no bad captions; near duplicates as in the dev pool's good pairs (25%)
}


def subpool(data: dict[str, Any], bad: Optional[float], size: int, seed: int = 0) -> Optional[np.ndarray]:
    """Pool indices of a sub-pool with a fraction ``bad`` of bad captions (``None``: the whole pool)."""
    if bad is None:
        return None
    kind = torch.as_tensor(data['pool']['kind'])
    is_bad = (kind == le.KIND_CODES['mismatched']) | (kind == le.KIND_CODES['junk'])
    n_bad = int(round(bad * size))
    bad_ids, good_ids = is_bad.nonzero().flatten(), (~is_bad).nonzero().flatten()
    if n_bad > len(bad_ids) or size - n_bad > len(good_ids):
        raise ValueError(f'a {size}-pair sub-pool with {bad:.0%} bad captions needs {n_bad} bad and {size - n_bad} '
                         f'good pairs; the pool has {len(bad_ids)} and {len(good_ids)}')
    g = torch.Generator().manual_seed(seed)
    pick = [ids[torch.randperm(len(ids), generator=g)[:k]] for ids, k in ((bad_ids, n_bad), (good_ids, size - n_bad))]
    return torch.sort(torch.cat(pick)).values.numpy()


# losses of the rows that use the reference inside the loss (issue 30), read from the pool's cached reference columns
DRRHO = {'name': 'drrho', 'form': 'sigmoid', 'tau': 1.0}
DISTILL = {'name': 'distill', 'form': 'sigmoid', 'distill': 1.0}


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    name: str
    kind: str  # 'uniform' | 'oracle' | 'offline' | 'jest'
    keep: float = 1.0  # offline: fraction of the pool kept
    filter_ratio: float = 0.0  # jest
    flexi: bool = False
    multires: bool = False
    loss: Any = 'sigmoid'  # the training loss spec (``model.loss``): a steered loss reads the cached reference
    prefilter: Optional[float] = None  # jest: keep this top fraction of the pool by the reference first (offline)

    @property
    def reads_cached(self) -> bool:
        """Batches carry the pool's cached reference columns (JEST scores with them; steered losses train on them)."""
        return self.kind == 'jest' or self.loss != 'sigmoid'

    @property
    def uses_reference(self) -> bool:
        """The run needs the reference and its one-off pool embedding pass (counted in the all-in columns)."""
        return self.kind == 'offline' or self.reads_cached  # JEST (with or without a prefilter) reads the cache

    @property
    def plain_jest(self) -> bool:
        """JEST as the paper runs it (SigLIP loss, the whole pool): the candidates for the noise pools' JEST row."""
        return self.kind == 'jest' and self.loss == 'sigmoid' and self.prefilter is None


_ALL = dict(flexi=True, multires=True)  # every saving: cached reference, flexi scoring, multi-resolution training
METHODS = {m.name: m for m in (
    Method('uniform', 'uniform'),
    Method('offline-0.5', 'offline', keep=0.5),
    Method('offline-0.2', 'offline', keep=0.2),
    Method('jest-0.8-all', 'jest', filter_ratio=0.8, **_ALL),
    Method('jest-0.5-all', 'jest', filter_ratio=0.5, **_ALL),
    Method('jest-0.9-all', 'jest', filter_ratio=0.9, **_ALL),
    Method('oracle', 'oracle'),
    Method('jest-0.8-cached', 'jest', filter_ratio=0.8),
    Method('jest-0.8-cached-flexi', 'jest', filter_ratio=0.8, flexi=True),
    # the reference in the loss (issue 30): steering, distillation, and the combinations with selection
    Method('drrho', 'uniform', loss=DRRHO),
    Method('uniform-distill', 'uniform', loss=DISTILL),
    Method('jest-0.8-all-distill', 'jest', filter_ratio=0.8, loss=DISTILL, **_ALL),
    Method('jest-0.5-all-distill', 'jest', filter_ratio=0.5, loss=DISTILL, **_ALL),
    Method('offline-0.5-then-jest-0.8-all', 'jest', filter_ratio=0.8, prefilter=0.5, **_ALL),
    Method('offline-0.5-distill', 'offline', keep=0.5, loss=DISTILL),  # distillation on the offline side too
)}
CORE = ('uniform', 'offline-0.5', 'jest-0.8-all', 'offline-0.2', 'jest-0.9-all')  # the dev pool's first rows
LADDER = ('jest-0.8-cached', 'jest-0.8-cached-flexi')  # the savings one at a time: run after everything else
STEERING = ('drrho', 'uniform-distill', 'jest-0.8-all-distill', 'jest-0.5-all-distill',
            'offline-0.5-then-jest-0.8-all', 'offline-0.5-distill')
# noise pools: uniform, the best JEST configuration on the dev pool and offline-0.5 on each pool, then offline-0.2
BENCHMARK_METHODS = ('uniform', 'offline-0.5', 'offline-0.2', 'jest-0.8-all', 'jest-0.5-all', 'jest-0.9-all', 'oracle')


def study_settings(quick: bool = False, **overrides: Any) -> le.Settings:
    """learning_efficiency's settings, shortened to fit a shared 2-core machine (see BENCHMARKS.md)."""
    base = dict(steps=240, eval_every=30, reference_steps=600, eval_size=1000, seeds=(0, 1, 2))
    if quick:
        base = dict(le.QUICK, steps=20, eval_every=10, reference_steps=40, pool_size=1500, curated_size=300,
                    eval_size=200)
    return le.Settings(**{**base, **overrides})


def model_config(model: str, s: le.Settings) -> dict:
    """open_clip config of ``model`` with the benchmark's compact vocabulary and context length."""
    if model == 'proportional':
        cfg = json.loads((model_config_dir() / 'jest-tiny-b16prop.json').read_text())
        cfg['text_cfg'] = {**cfg['text_cfg'], 'vocab_size': s.vocab_size, 'context_length': s.context_length}
        return cfg
    if model == 'benchmark':
        return le.model_config(dataclasses.replace(s, patch_size=8))
    raise ValueError(f"model must be 'proportional' or 'benchmark', got {model!r}")


def native_patch(model: str, s: le.Settings) -> int:
    return int(model_config(model, s)['vision_cfg']['patch_size'])


def make_model(model: str, s: le.Settings, tokenizer: Any, seed: int, multires: bool = False,
               loss: Any = 'sigmoid') -> CLIPModel:
    torch.manual_seed(seed)  # benchmark script: the model init is the one global draw
    p = native_patch(model, s)
    return CLIPModel(model_config(model, s), loss=loss, classnames=zero_shot_classnames(),
                     class_templates=ZERO_SHOT_TEMPLATES, low_res_fraction=0.5 if multires else 0.0,
                     low_res_patch_size=2 * p if multires else None, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# curve recording with process CPU time
# ---------------------------------------------------------------------------------------------------------------
class CPURecorder(le.CurveRecorder):
    """learning_efficiency's recorder plus ``cpu``: process CPU seconds of training since fit start, evaluation
    excluded (``time.process_time``; with one torch thread it is the work done, robust to a shared machine)."""

    def fit_start(self, state, logger) -> None:
        self.cpu0, self.eval_cpu = time.process_time(), 0.0
        super().fit_start(state, logger)

    def _record(self, state, step: int) -> None:
        now = time.process_time()
        super()._record(state, step)
        self.curve[-1]['cpu'] = now - self.cpu0 - self.eval_cpu
        self.eval_cpu += time.process_time() - now


# ---------------------------------------------------------------------------------------------------------------
# reference: trained once per (model, vocabulary), then the one-off pool embedding pass per pool
# ---------------------------------------------------------------------------------------------------------------
def _tokenizer_hash(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.table.numpy().tobytes()).hexdigest()[:10]


def train_reference(model: str, s: le.Settings, data: dict[str, Any], cache: Path) -> dict[str, Any]:
    """The reference (same architecture as the learner) trained on the curated set; its cost in FLOPs and CPU s."""
    arch = hashlib.sha256(json.dumps(model_config(model, s), sort_keys=True).encode()).hexdigest()[:8]
    key = (f'{model}{arch}_{_tokenizer_hash(data["tokenizer"])}_{s.curated_size}_{s.reference_steps}_{s.lr}'
           f'_b{s.batch_size}')
    path = cache / f'cs_reference_{key}.pt'
    net = make_model(model, s, data['tokenizer'], seed=1000)
    flops_step = le.uniform_step_flops(net, s.batch_size)
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        net.towers.load_state_dict(saved['towers'])
    else:
        recorder = CPURecorder(data, max(s.reference_steps // 10, 1), s.reference_steps, flops_step, s.batch_size)
        le._fit(net, le.make_loader(le.TensorPool(data['curated']), s.batch_size, seed=1000), s, s.reference_steps,
                1000, recorder=recorder)
        saved = {'towers': net.towers.state_dict(), 'curve': recorder.curve}
        torch.save(saved, path)
    return {'towers': net.frozen_copy(), 'net': net, 'curve': saved['curve'], 'final': saved['curve'][-1],
            'train_cpu': saved['curve'][-1]['cpu'], 'train_examples': s.reference_steps * s.batch_size,
            'train_flops': le.replayed_flops(flops_step, le.TensorPool(data['curated']), s.batch_size, 1000,
                                             s.reference_steps)}


def embed_pool(reference: dict[str, Any], pool: dict[str, Any]) -> dict[str, Any]:
    """The one-off pass: reference embeddings of every pool pair (JEST's cached columns, offline filtering's
    input), timed in process CPU seconds and costed in FLOPs."""
    towers, clip = reference['towers'], reference['net'].towers.clip
    feats: dict[str, list] = {'ref_image_features': [], 'ref_text_features': []}
    t0 = time.process_time()
    with torch.no_grad():
        for start in range(0, len(pool['images']), 1000):
            img = torch.as_tensor(pool['images'][start:start + 1000]).float().div_(127.5).sub_(1.0)[:, None]
            out = towers(img.expand(-1, 3, -1, -1).contiguous(), pool['text'][start:start + 1000])
            feats['ref_image_features'].append(out['image_features'].half())
            feats['ref_text_features'].append(out['text_features'].half())
    cpu = time.process_time() - t0
    n = len(pool['images'])
    cached = {k: torch.cat(v) for k, v in feats.items()}
    cached['ref_logit_scale'] = out['logit_scale'].float().reshape(1).expand(n).clone()
    cached['ref_logit_bias'] = out['logit_bias'].float().reshape(1).expand(n).clone()
    flops = sum(len(chunk) * vit_forward_flops(clip.visual, 32)
                + bucketed_text_flops(clip, le.text_counts(chunk), towers.text_buckets, towers.text_bucket_overhead)
                for chunk in pool['text'].split(1000))
    scores = reference_scores(cached['ref_image_features'], cached['ref_text_features'], score='clip')
    return {'cached': cached, 'scores': scores, 'embed_cpu': cpu, 'embed_flops': float(flops)}


# ---------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------
def mean_step_flops(net: CLIPModel, text: torch.Tensor, method: Method, b: int, patch: int) -> float:
    """FLOPs of one step of ``method`` at the caption-length histogram of ``text`` (to size the schedule)."""
    n = b if method.kind != 'jest' else int(round(b / (1.0 - method.filter_ratio)))
    counts = le.text_counts(text[torch.randperm(len(text), generator=torch.Generator().manual_seed(0))[:4096]])
    counts = [c * n / sum(counts) for c in counts]
    f = step_flops(net, superbatch=n, subbatch=b, image_size=32, reference_cached=True,
                   learner_patch_size=2 * patch if method.flexi else None, text_length_counts=counts,
                   text_buckets=net.towers.text_buckets, text_bucket_overhead=net.towers.text_bucket_overhead,
                   low_res_fraction=net.low_res_fraction, low_res_patch_size=net.low_res_patch_size,
                   uses_learner=method.kind == 'jest', uses_reference=method.kind == 'jest')
    return f['total'] if method.kind == 'jest' else f['uniform_train']


EVAL_SIZE = 500  # runs are evaluated on the first 500 of the 1000 rendered evaluation examples (CPU budget)


def eval_subset(data: dict[str, Any], n: int) -> dict[str, Any]:
    """``data`` with its evaluation set cut to the first ``n`` examples."""
    return {**data, 'eval': {k: v[:n] for k, v in data['eval'].items()}}


def run_one(model: str, method: Method, seed: int, s: le.Settings, data: dict[str, Any], emb: dict[str, Any],
            pool_ids: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Train ``method`` for ``s.steps`` steps -- longer if its steps are cheaper than uniform's, so its curve reaches
    uniform's FLOP budget -- and return the curve (examples, FLOPs, CPU seconds, accuracy)."""
    b, pool, patch = s.batch_size, data['pool'], native_patch(model, s)
    net = make_model(model, s, data['tokenizer'], seed=seed, multires=method.multires, loss=method.loss)
    subset = pool_ids if pool_ids is not None else np.arange(len(pool['images']))
    if method.kind == 'oracle':
        subset = subset[pool['clean'][subset] > 0]
    keep = method.keep if method.kind == 'offline' else method.prefilter
    if keep is not None and keep < 1.0:  # the pool's top fraction by the reference's CLIP score
        subset = subset[keep_indices(emb['scores'][torch.as_tensor(subset)], keep=keep).numpy()]
    steps = s.steps
    if method.kind != 'uniform':  # cheaper steps (scoring at low resolution, shorter kept captions): train longer
        uniform = mean_step_flops(net, pool['text'][pool_ids] if pool_ids is not None else pool['text'],
                                  METHODS['uniform'], b, patch)
        ratio = mean_step_flops(net, pool['text'][subset], method, b, patch) / uniform
        if ratio < 1.05:
            steps = int(math.ceil(s.steps * 1.05 / ratio / s.eval_every) * s.eval_every)
    algorithms, n = [], b
    if method.kind == 'jest':
        n = int(round(b / (1.0 - method.filter_ratio)))
        algorithms.append(JEST(reference='cached', filter_ratio=method.filter_ratio, n_chunks=s.n_chunks,
                               learner_patch_size=2 * patch if method.flexi else None,
                               track_keys=le.CurveRecorder.TRACK, seed=seed))
    dataset = le.TensorPool(pool, subset, emb['cached'] if method.reads_cached else None)
    recorder = CPURecorder(eval_subset(data, EVAL_SIZE), s.eval_every, steps, le.uniform_step_flops(net, b), b)
    t0 = time.time()
    le._fit(net, le.make_loader(dataset, n, seed=seed), s, steps, seed, algorithms, recorder)
    return {
        'model': model, 'method': method.name, 'seed': seed, 'spec': dataclasses.asdict(method),
        'uses_reference': method.uses_reference, 'superbatch': n,
        'subbatch': b, 'steps': steps, 'base_steps': s.steps, 'pool_size': len(dataset),
        'pool_clean_fraction': float(np.mean(pool['clean'][dataset.subset.numpy()])),
        'curve': recorder.curve, 'selection': recorder.selection_summary(), 'seconds': time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------------------------
# the plan: priority order, resumable
# ---------------------------------------------------------------------------------------------------------------
def flops_to_match(run: dict[str, Any], target: float) -> Optional[float]:
    """FLOPs where ``run``'s smoothed zero-shot curve first reaches ``target`` (``None``: never)."""
    c = run['curve']
    return le.crossing([p['flops'] for p in c], [p['zero_shot'] for p in c], target)


def best_jest(runs: dict[str, list[dict]]) -> str:
    """The plain JEST configuration (:attr:`Method.plain_jest`) with the least mean FLOPs-to-match uniform's final
    zero-shot (never = infinite)."""
    target = float(np.mean([le.smooth([p['zero_shot'] for p in r['curve'] if p['step'] <= r['base_steps']])[-1]
                            for r in runs['uniform']]))
    cost = {name: np.mean([flops_to_match(r, target) or math.inf for r in rs])
            for name, rs in runs.items() if name in METHODS and METHODS[name].plain_jest}
    return min(cost, key=cost.get)


def best_steered(runs: dict[str, list[dict]], k: int = 2) -> list[str]:
    """The ``k`` rows of :data:`STEERING` with the highest mean zero-shot at uniform's FLOP budget (run cost)."""
    from compute_study_analysis import at_budget  # noqa: PLC0415

    mean = {name: np.mean([v if v is not None else -1.0 for v in at_budget(runs, name)])
            for name in STEERING if name in runs}
    return sorted(mean, key=mean.get, reverse=True)[:k]


def plan(phase: str, seeds: Sequence[int], best: Sequence[str] = ()) -> list[tuple[str, str, str, int]]:
    """``(model, pool, method, seed)`` in priority order for ``phase`` (``best``: the dev pool's best rows, for the
    noise pools)."""
    pools = ('bad10', 'bad70', 'dups')
    by_phase = {
        'core': [('proportional', 'dev', m, sd) for sd in seeds for m in CORE],
        'dev': [('proportional', 'dev', m, sd) for sd in seeds for m in METHODS
                if m not in LADDER and m not in STEERING],
        'ladder': [('proportional', 'dev', m, sd) for sd in seeds for m in LADDER],
        'benchmark': [('benchmark', 'dev', m, sd) for sd in seeds for m in BENCHMARK_METHODS],
        'noise': ([('proportional', pool, m, sd) for sd in seeds for pool in pools
                   for m in ('uniform', *best, 'offline-0.5')]
                  + [('proportional', pool, 'offline-0.2', sd) for sd in seeds for pool in pools]),
        'steering': [('proportional', 'dev', m, sd) for sd in seeds for m in STEERING],
        'steering-noise': [('proportional', pool, m, sd) for sd in seeds for pool in pools for m in best],
    }
    return by_phase[phase]


class Study:
    """Loads pools, references and saved runs lazily; trains and saves what is missing."""

    def __init__(self, s: le.Settings, out: Path, cache: Path, analyse_only: bool = False):
        self.s, self.out, self.cache, self.analyse_only = s, out, cache, analyse_only
        self._base: dict[str, tuple] = {}
        self.t0 = time.time()

    def settings(self, pool: str) -> le.Settings:
        return self.s

    def tag(self, model: str, pool: str) -> str:
        spec = [dataclasses.asdict(self.s), model_config(model, self.s), EVAL_SIZE]
        if POOLS[pool] is not None:
            spec.append([POOLS[pool], SUBPOOL_SIZE])
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:8]

    def pool(self, model: str, pool: str) -> tuple[le.Settings, dict, dict, Optional[np.ndarray]]:
        """``(settings, data, embeddings, sub-pool indices)``; the one-off costs are saved to references/."""
        if model not in self._base:
            data = le.build_data(self.s, self.cache)
            ref = train_reference(model, self.s, data, self.cache)
            self._base[model] = (data, ref, embed_pool(ref, data['pool']))
            log.info('%s ready: reference %s (elapsed %.0fs)', model, ref['final'], time.time() - self.t0)
        data, ref, emb = self._base[model]
        subset = subpool(data, POOLS[pool], SUBPOOL_SIZE)
        n, total = (len(subset) if subset is not None else len(data['pool']['images'])), len(data['pool']['images'])
        clean = data['pool']['clean'] if subset is None else data['pool']['clean'][subset]
        summary = {k: ref[k] for k in ('final', 'curve', 'train_cpu', 'train_flops', 'train_examples')}
        # the one-off embedding pass covers the pool trained on: the sub-pool's share of the measured pass
        summary.update(embed_cpu=emb['embed_cpu'] * n / total, embed_flops=emb['embed_flops'] * n / total,
                       tag=self.tag(model, pool), pool_size=n, pool_clean_fraction=float(np.mean(clean)))
        path = self.out / 'references' / f'{model}_{pool}.json'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary))
        return self.s, data, emb, subset

    def path(self, model: str, pool: str, method: str, seed: int) -> Path:
        return self.out / 'runs' / model / pool / f'{method}_seed{seed}.json'

    def get(self, model: str, pool: str, method: str, seed: int) -> Optional[dict]:
        path = self.path(model, pool, method, seed)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get('settings_tag') == self.tag(model, pool):
                return saved
            if not self.analyse_only:  # never overwrite a run made with other settings
                raise ValueError(f'{path} was run with other settings (tag {saved.get("settings_tag")}, now '
                                 f'{self.tag(model, pool)}): give these settings their own --out')
        if self.analyse_only:
            return None
        s, data, emb, subset = self.pool(model, pool)
        result = run_one(model, METHODS[method], seed, s, data, emb, subset)
        result['settings_tag'] = self.tag(model, pool)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        c = result['curve'][-1]
        log.info('%s/%s %-22s seed %d: zero-shot %.3f (%d steps, %.0fs, elapsed %.0fs)', model, pool, method, seed,
                 c['zero_shot'], result['steps'], result['seconds'], time.time() - self.t0)
        return result

    def runs(self, model: str, pool: str, seeds: Sequence[int]) -> dict[str, list[dict]]:
        """Saved runs of ``model`` on ``pool`` (no training), by method."""
        out: dict[str, list[dict]] = {}
        for path in sorted((self.out / 'runs' / model / pool).glob('*_seed*.json')):
            method, seed = path.stem.rsplit('_seed', 1)
            saved = json.loads(path.read_text())
            if int(seed) in seeds and saved.get('settings_tag') == self.tag(model, pool):
                out.setdefault(method, []).append(saved)
        return out


def _best_noise_jest(dev: dict[str, list[dict]]) -> list[str]:
    return [best_jest(dev)] if 'uniform' in dev and any(m in METHODS and METHODS[m].plain_jest for m in dev) else []


def _best_noise_steered(dev: dict[str, list[dict]]) -> list[str]:
    return best_steered(dev) if 'uniform' in dev else []


# the phase a user names (--phases) for each part of the plan; the noise parts take the dev pool's best rows
PHASES = {'core': 'dev', 'dev': 'dev', 'noise': 'noise', 'benchmark': 'benchmark', 'ladder': 'ladder',
          'steering': 'steering', 'steering-noise': 'steering'}
BEST_OF = {'noise': _best_noise_jest, 'steering-noise': _best_noise_steered}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny pool, few steps, one seed (smoke test)')
    p.add_argument('--out', default=None, help=f'results folder (default {RESULTS.relative_to(ROOT)})')
    p.add_argument('--cache', default='/tmp/composer_jest_bench')
    p.add_argument('--threads', type=int, default=1)
    names = list(dict.fromkeys(PHASES.values()))
    p.add_argument('--phases', nargs='*', default=names, choices=names)
    p.add_argument('--seeds', type=int, nargs='*', default=None, help='seeds (default 0 1 2; seed 0 of every '
                   'phase runs before seeds 1 and 2)')
    p.add_argument('--methods', nargs='*', default=None, choices=list(METHODS),
                   help='only these rows of the chosen phases (default: all)')
    p.add_argument('--steps', type=int, default=None, help="uniform's budget in steps of b = 64 (default 240); "
                   'another budget needs its own --out (default: results/compute_study_<steps>steps)')
    p.add_argument('--analyse-only', action='store_true', help='tables and plots from the saved runs')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    torch.set_num_threads(args.threads)
    longer = {} if args.steps is None else dict(steps=args.steps, eval_every=max(args.steps // 8, 1))
    s = study_settings(args.quick, **longer)
    seeds = tuple(args.seeds) if args.seeds is not None else s.seeds
    out = Path(args.out) if args.out else RESULTS if not longer else RESULTS.parent / f'compute_study_{s.steps}steps'
    study = Study(s, out, Path(args.cache), args.analyse_only)
    if args.quick:
        jobs = [('proportional', 'dev', m, 0) for m in ('uniform', 'offline-0.5', 'jest-0.8-all', 'uniform-distill')]
    else:
        # priority (a shared 2-core machine may stop the study anywhere): the dev pool's core rows, seed 0; the noise
        # pools, seed 0; the other dev rows and seed 1; then more seeds, today's model and the savings one at a time;
        # the steered rows (issue 30) on the dev pool, then their best two on the noise pools
        order = [('core', seeds[:1]), ('noise', seeds[:1]), ('dev', seeds[:2]), ('noise', seeds[1:2]),
                 ('dev', seeds[2:]), ('benchmark', seeds[:1]), ('ladder', seeds[:1]), ('noise', seeds[2:]),
                 ('benchmark', seeds[1:]), ('ladder', seeds[1:]), ('steering', seeds), ('steering-noise', seeds)]
        jobs = [job for phase, group in order if group and PHASES[phase] in args.phases
                for job in ([('best', phase, group)] if phase in BEST_OF else plan(phase, group))]
    wanted = lambda job: args.methods is None or job[2] in args.methods  # noqa: E731
    for job in jobs:
        if job[0] == 'best':  # the noise pools take the best rows on the dev pool so far
            phase, group = job[1], job[2]
            for sub in filter(wanted, plan(phase, group, BEST_OF[phase](study.runs('proportional', 'dev', seeds)))):
                study.get(*sub)
        elif wanted(job):
            study.get(*job)
    from compute_study_analysis import analyse_all  # noqa: PLC0415

    analyse_all(study, seeds, quick=args.quick)


if __name__ == '__main__':
    main()
