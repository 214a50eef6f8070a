"""Golden draws: JEST's selections and statistics, pinned at commit 793c3fd (before the functional selection step).

``tests/fixtures/jest_golden_draws.json`` holds, for nine settings (losses, joint/independent, the four scores,
false negatives, temperature and track keys, global scope at rank 1 of 2, cached reference columns), two
``AFTER_DATALOADER`` steps of a JEST driven on a minimal state: the kept positions, the global draw order, the
kept ``index`` column, every logged metric but the wall time, and the generator's next value. The refactored
adapter must reproduce them: the same seed gives the same indices and statistics. Regenerate only when a change
of the draws is intended (``PYTHONPATH=tests python tests/jest/test_algorithm_golden.py OUT.json``).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from composer.core import Event
from composer.devices import DeviceCPU
from model_helpers import make_model

import composer_jest.jest.algorithm as algorithm_module
from composer_jest import JEST
from composer_jest.core.batch import CACHED_REFERENCE_KEYS

GOLDEN = Path(__file__).parents[1] / 'fixtures' / 'jest_golden_draws.json'
N = 16
CASES = {
    'sigmoid_joint': dict(filter_ratio=0.5, n_chunks=4, seed=3),
    'softmax_joint': dict(filter_ratio=0.75, n_chunks=2, seed=5, loss='softmax'),
    'sigmoid_independent': dict(filter_ratio=0.5, n_chunks=4, seed=7, selection='independent'),
    'hard_learner': dict(filter_ratio=0.5, n_chunks=4, seed=1, score='hard_learner', reference=None),
    'uniform': dict(filter_ratio=0.5, seed=2, score='uniform', reference=None),
    'dcl_false_negatives': dict(filter_ratio=0.5, n_chunks=3, seed=4,
                                loss={'name': 'dcl', 'false_negatives': {'key': 'label'}}),
    'triplet_temperature': dict(filter_ratio=0.25, n_chunks=3, seed=6, loss='triplet', temperature=0.5,
                                track_keys=('clean',)),
    'global_rank1': dict(filter_ratio=0.5, n_chunks=4, seed=3, scope='global'),
    'cached_reference': dict(filter_ratio=0.5, n_chunks=4, seed=8, reference='cached'),
}


class _Logger:
    def __init__(self):
        self.metrics: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.append(dict(metrics))


def _batch(step: int, tokenizer) -> dict:
    g = torch.Generator().manual_seed(step)
    words = ['red', 'green', 'blue', 'circle', 'square', 'star']
    captions = [' '.join(words[int(i)] for i in torch.randint(0, 6, (3,), generator=g)) for _ in range(N)]
    return {'image': torch.randn(N, 3, 32, 32, generator=g), 'text': tokenizer(captions),
            'index': torch.randperm(1000, generator=g)[:N], 'label': torch.randint(0, 4, (N,), generator=g),
            'clean': (torch.arange(N) % 3 == 0).long()}


def _cache_reference(batch: dict, reference) -> None:
    with torch.no_grad():
        f = reference.score_features(batch)
    batch.update(zip(CACHED_REFERENCE_KEYS, (f['image_features'].half(), f['text_features'].half(),
                                             f['logit_scale'].reshape(1).expand(N),
                                             f['logit_bias'].reshape(1).expand(N))))


@functools.cache
def _model(seed: int):
    """The learner (seed 0) and the reference (seed 1), built once: scoring leaves their weights as they are."""
    return make_model(seed=seed)


def run_case(name: str) -> list[dict]:
    """Two steps of JEST with the settings ``CASES[name]``: what each kept and logged, then the next draw."""
    torch.set_num_threads(1)
    kwargs = dict(CASES[name])
    model, reference = _model(0), _model(1)
    kwargs.setdefault('reference', reference)
    jest = JEST(**kwargs)
    state = SimpleNamespace(model=model, device=DeviceCPU(), precision='fp32', precision_config=None,
                            dataloader=SimpleNamespace(batch_size=N), device_train_microbatch_size=N,
                            batch=None, fsdp_enabled=False, timestamp=SimpleNamespace(batch=0))
    jest.apply(Event.FIT_START, state, _Logger())
    out = []
    for step in range(2):
        batch = _batch(step, model.tokenizer)
        if kwargs['reference'] == 'cached':
            _cache_reference(batch, reference)
        state.batch = batch
        logger = _Logger()
        jest.apply(Event.AFTER_DATALOADER, state, logger)
        metrics = {k: v for k, v in logger.metrics[-1].items() if k != 'jest/scoring_time'}
        out.append({'indices': jest.last_indices.tolist(), 'global': jest.last_global_indices.tolist(),
                    'kept_index': state.batch['index'].tolist(), 'metrics': metrics})
    out.append({'next_draw': int(torch.randint(0, 2**31, (1,), generator=jest.generator))})
    return out


def _with_fake_dist(name: str, monkeypatch) -> None:
    if name == 'global_rank1':  # rank 1 of 2; the other rank streamed the same super-batch
        fake = SimpleNamespace(get_global_rank=lambda: 1, get_world_size=lambda: 2,
                               all_gather=lambda t: [t.clone(), t.clone()])
        monkeypatch.setattr(algorithm_module, 'dist', fake)


@pytest.mark.parametrize('name', sorted(CASES))
def test_jest_draws_match_the_golden_draws(name, monkeypatch):
    _with_fake_dist(name, monkeypatch)
    golden = json.loads(GOLDEN.read_text())[name]
    got = run_case(name)
    assert got[-1] == golden[-1], 'the generator advanced differently'
    for step, (mine, pinned) in enumerate(zip(got[:-1], golden[:-1])):
        for key in ('indices', 'global', 'kept_index'):
            assert mine[key] == pinned[key], (step, key)
        assert sorted(mine['metrics']) == sorted(pinned['metrics']), step
        for key, value in pinned['metrics'].items():
            assert mine['metrics'][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)


if __name__ == '__main__':  # regenerate: PYTHONPATH=tests python tests/jest/test_algorithm_golden.py OUT.json
    with pytest.MonkeyPatch.context() as mp:
        results = {}
        for case in CASES:
            _with_fake_dist(case, mp)
            results[case] = run_case(case)
            mp.undo()
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
