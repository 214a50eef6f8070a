"""Extra rows of the compute study (issue 30): the reference used in the loss, alone and with JEST.

Rows (the proportional model on the study's dev pool, its settings, seeds, reference, cached embeddings, curve
recorder and FLOP / CPU-time accounting -- :func:`benchmarks.compute_study.run_one` itself, called by import):

- ``drrho``: uniform batches, the DRRho steered loss (``{name: drrho, form: sigmoid, tau: 1.0}``);
- ``uniform-distill``: uniform batches, SigLIP + λ = 1 distillation (``{name: distill, form: sigmoid}``);
- ``jest-0.8-all-distill``: the study's ``jest-0.8-all`` row with the distillation loss;
- ``offline-0.5-then-jest-0.8-all``: keep the top half of the pool by the reference's CLIP score (as ``offline-0.5``),
  then ``jest-0.8-all`` on the kept pool (SigLIP loss).

The steered losses read the pool's cached reference columns (the same one-off embedding pass as JEST's and offline
filtering's). Their extra work per step -- the reference's ``n x n`` similarities and a few elementwise terms -- is not
added to the analytic FLOPs (:func:`loss_flops` gives it; < 0.1% of a step), and it is inside the measured CPU time.

``--micro`` times one training step (forward, loss, backward, AdamW) of uniform SigLIP against the same step with each
steered loss, interleaved in one process on the same batches (the <= 5% goal of issue 30).

Examples::

    python benchmarks/steering_rows.py --rows drrho uniform-distill --seeds 0
    python benchmarks/steering_rows.py --micro --reps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import compute_study as cs  # noqa: E402

from composer_jest.core.filtering import keep_indices  # noqa: E402
from composer_jest.data.demo.fashion_web import ZERO_SHOT_TEMPLATES, zero_shot_classnames  # noqa: E402
from composer_jest.models.clip import CLIPModel  # noqa: E402

log = logging.getLogger('steering_rows')
RESULTS = ROOT / 'benchmarks' / 'results' / 'steering'
DRRHO = {'name': 'drrho', 'form': 'sigmoid', 'tau': 1.0}
DISTILL = {'name': 'distill', 'form': 'sigmoid', 'distill': 1.0}

# row -> (study method it runs as, loss spec, offline keep fraction applied first or None)
ROWS = {
    'drrho': ('uniform', DRRHO, None),
    'uniform-distill': ('uniform', DISTILL, None),
    'jest-0.8-all-distill': ('jest-0.8-all', DISTILL, None),
    'offline-0.5-then-jest-0.8-all': ('jest-0.8-all', 'sigmoid', 0.5),
}
# the study's own rows, re-run here (same run_one, same settings) for seeds the study has not saved yet; the table
# takes the study's saved run wherever it has one
BASELINES = {'uniform': ('uniform', 'sigmoid', None), 'offline-0.5': ('offline-0.5', 'sigmoid', None),
             'jest-0.8-all': ('jest-0.8-all', 'sigmoid', None)}
ROWS.update(BASELINES)


def make_model_with(loss: Any):
    """compute_study's ``make_model`` with another training loss (the same config, init seed and tokenizer)."""

    def make(model: str, s, tokenizer: Any, seed: int, multires: bool = False) -> CLIPModel:
        torch.manual_seed(seed)  # benchmark script: the model init is the one global draw (as compute_study)
        p = cs.native_patch(model, s)
        return CLIPModel(cs.model_config(model, s), loss=loss, classnames=zero_shot_classnames(),
                         class_templates=ZERO_SHOT_TEMPLATES, low_res_fraction=0.5 if multires else 0.0,
                         low_res_patch_size=2 * p if multires else None, tokenizer=tokenizer)

    return make


class _CachedPool(cs.le.TensorPool):
    """learning_efficiency's pool that always carries the cached reference columns (the steered losses read them)."""

    cached: Optional[dict] = None

    def __init__(self, part, subset=None, reference=None):
        super().__init__(part, subset, reference if reference is not None else self.cached)


def run_row(row: str, seed: int, s, data: dict, emb: dict) -> dict[str, Any]:
    """One run of ``row`` through ``compute_study.run_one`` (its make_model / pool class swapped for the loss)."""
    method, loss, keep = ROWS[row]
    pool_ids = None
    if keep is not None:  # the offline filter's kept pool, then the method on it
        pool_ids = keep_indices(emb['scores'], keep=keep).numpy()
    saved = cs.make_model, cs.le.TensorPool
    _CachedPool.cached = emb['cached']
    cs.make_model, cs.le.TensorPool = make_model_with(loss), _CachedPool
    try:
        result = cs.run_one('proportional', cs.METHODS[method], seed, s, data, emb, pool_ids)
    finally:
        cs.make_model, cs.le.TensorPool = saved
    result.update(row=row, loss=loss, offline_keep=keep, method=row, study_method=method)
    return result


def run_rows(rows: Sequence[str], seeds: Sequence[int], out: Path, cache: Path) -> None:
    study = cs.Study(cs.study_settings(), out, cache)
    s, data, emb, _ = study.pool('proportional', 'dev')
    for seed in seeds:
        for row in rows:
            path = out / 'runs' / 'proportional' / 'dev' / f'{row}_seed{seed}.json'
            if path.is_file():
                continue
            t0 = time.time()
            result = run_row(row, seed, s, data, emb)
            result['settings_tag'] = study.tag('proportional', 'dev')
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
            c = result['curve'][-1]
            log.info('%s seed %d: zero-shot %.3f after %d steps (%.0f s)', row, seed, c['zero_shot'], result['steps'],
                     time.time() - t0)


# ---------------------------------------------------------------------------------------------------------------
# micro-benchmark: a uniform step with and without the steered loss
# ---------------------------------------------------------------------------------------------------------------
def loss_flops(n: int, d: int) -> float:
    """Extra FLOPs of a steered loss on ``n`` pairs: the reference's ``n x n`` cosines (``2 n² d``) plus ~30
    elementwise operations per pair (both directions, forward and backward)."""
    return 2.0 * n * n * d + 30.0 * n * n


def micro(reps: int, b: int = 64) -> dict[str, Any]:
    """Median CPU seconds of a training step per loss, interleaved (each rep runs every loss once, in a random order,
    on the same batch), and of the loss alone (forward + backward on fixed features)."""
    s = cs.study_settings()
    cfg = cs.model_config('proportional', s)
    g = torch.Generator().manual_seed(0)
    dim = cfg['embed_dim']
    batch = {'image': torch.randn(b, 3, 32, 32, generator=g),
             'text': torch.randint(1, s.vocab_size - 1, (b, 12), generator=g),
             'ref_image_features': torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).half(),
             'ref_text_features': torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).half(),
             'ref_logit_scale': torch.full((b,), 10.0), 'ref_logit_bias': torch.full((b,), -10.0)}
    batch['text'][:, -1] = s.vocab_size - 1  # EOT last: full-length captions
    losses = {'uniform (sigmoid)': 'sigmoid', 'drrho sigmoid': DRRHO, 'distill sigmoid': DISTILL,
              'drrho softmax + distill': {'name': 'drrho', 'form': 'softmax', 'distill': 1.0},
              'distill softmax': {'name': 'distill', 'form': 'softmax'}}
    models = {}
    for name, loss in losses.items():
        torch.manual_seed(0)  # the same init for every model
        model = CLIPModel(cfg, loss=loss, tokenizer=lambda t: t)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {k: [] for k in losses}
    names = list(models)
    for rep in range(reps + 3):
        for k in torch.randperm(len(names), generator=g).tolist():  # a fresh order every rep
            model, opt = models[names[k]]
            t0 = time.process_time()  # CPU seconds of this process: robust to a shared machine (one torch thread)
            opt.zero_grad(set_to_none=True)
            model.loss(model(batch), batch).backward()
            opt.step()
            if rep >= 3:  # warm-up reps dropped
                times[names[k]].append(time.process_time() - t0)
    base = statistics.median(times['uniform (sigmoid)'])
    return {'batch': b, 'reps': reps, 'threads': torch.get_num_threads(), 'embed_dim': dim, 'clock': 'process CPU',
            'median_s': {k: statistics.median(v) for k, v in times.items()},
            'loss_only_median_s': loss_only(models, batch, reps * 5, g),
            'ratio_to_uniform': {k: statistics.median(v) / base for k, v in times.items()},
            'extra_flops_per_step': loss_flops(b, dim)}


# ---------------------------------------------------------------------------------------------------------------
# the table: the study's saved rows and these, through compute_study_analysis.analyse
# ---------------------------------------------------------------------------------------------------------------
def load_runs(folder: Path, tag: str, seeds: Sequence[int]) -> dict[str, list[dict]]:
    """Saved runs of the dev pool in ``folder`` with the study's settings tag, by row name."""
    out: dict[str, list[dict]] = {}
    for path in sorted((folder / 'runs' / 'proportional' / 'dev').glob('*_seed*.json')):
        name, seed = path.stem.rsplit('_seed', 1)
        run = json.loads(path.read_text())
        if run.get('settings_tag') == tag and int(seed) in seeds:
            out.setdefault(name, []).append(run)
    return out


def analyse_rows(out: Path, seeds: Sequence[int] = (0, 1, 2)) -> str:
    """The equal-compute table of the study's dev-pool rows plus these rows (``steering.md`` / ``.json``)."""
    import compute_study_analysis as csa  # noqa: PLC0415

    study = cs.Study(cs.study_settings(), cs.RESULTS, Path('/tmp'), analyse_only=True)
    tag = study.tag('proportional', 'dev')
    runs = load_runs(cs.RESULTS, tag, seeds)
    mine = load_runs(out, tag, seeds)
    for name in BASELINES:  # the study's run of a seed wins over a re-run here
        have = {r['seed'] for r in runs.get(name, [])}
        runs.setdefault(name, []).extend(r for r in mine.pop(name, []) if r['seed'] not in have)
    for name, rs in mine.items():
        # analyse() adds the one-off reference costs (its training + the pool embedding pass) for the kinds 'offline'
        # and 'jest'; the steered rows read the same cached embeddings, so they are counted as such (in memory only)
        runs[name] = [dict(r, spec={**r['spec'], 'kind': 'offline' if r['spec']['kind'] == 'uniform' else
                                    r['spec']['kind']}) for r in rs]
    ref = json.loads((cs.RESULTS / 'references' / 'proportional_dev.json').read_text())
    res = csa.analyse(runs, ref)
    text = csa.table(res)
    (out / 'steering.json').write_text(json.dumps(res, indent=1, default=str))
    (out / 'steering.md').write_text(text + '\n')
    return text


def loss_only(models: dict, batch: dict, reps: int, g: torch.Generator) -> dict[str, float]:
    """Median CPU seconds of each model's loss + its backward on fixed random features (no towers)."""
    b, dim = batch['ref_image_features'].shape
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for name, (model, _opt) in models.items():
            x, y = (torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
                    for _ in range(2))
            out = {'image_features': x, 'text_features': y, 'logit_scale': torch.tensor(10.0, requires_grad=True),
                   'logit_bias': torch.tensor(-10.0, requires_grad=True)}
            t0 = time.process_time()
            model.loss(out, batch).backward()
            times[name].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rows', nargs='*', default=[r for r in ROWS if r not in BASELINES], choices=list(ROWS))
    p.add_argument('--seeds', type=int, nargs='*', default=[0])
    p.add_argument('--out', default=str(RESULTS))
    p.add_argument('--cache', default='/tmp/composer_jest_bench')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--micro', action='store_true', help='time a step with each steered loss beside uniform')
    p.add_argument('--reps', type=int, default=30)
    p.add_argument('--analyse', action='store_true', help='the table of the saved runs (study rows and these)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.analyse:
        print(analyse_rows(out))
        return
    if args.micro:
        result = micro(args.reps)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'micro.json').write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return
    run_rows(args.rows, args.seeds, out, Path(args.cache))


if __name__ == '__main__':
    main()
