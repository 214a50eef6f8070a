"""Smoke test of the learning-efficiency benchmark: ``--quick`` end to end (no speed-up is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from composer_jest.data.demo.fashion_mnist import fashion_mnist_root

# ~2 min of CPU: run by .ci/run after the suite (`pytest -m slow`), not by README's test command
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / 'benchmarks' / 'learning_efficiency.py'


@pytest.fixture(scope='module')
def quick_results(tmp_path_factory):
    """``benchmarks/learning_efficiency.py --quick`` run as users run it (a subprocess); its output folder and the
    saved ``learning_efficiency.json``."""
    try:
        fashion_mnist_root()
    except FileNotFoundError as e:
        pytest.fail(f'Fashion-MNIST is not installed: {e}', pytrace=False)
    out, cache = tmp_path_factory.mktemp('le_out'), tmp_path_factory.mktemp('le_cache')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, str(SCRIPT), '--quick', '--out', str(out), '--cache', str(cache)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f'--quick exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}'
    return out, json.loads((out / 'learning_efficiency.json').read_text())


def test_quick_mode_writes_well_formed_results(quick_results):
    out, saved = quick_results
    assert (out / 'learning_efficiency.md').is_file()
    assert saved['plots']
    for name in saved['plots']:
        assert (out / name).stat().st_size > 1000 and name.endswith('.png')
    settings = saved['settings']
    assert math.isfinite(saved['target']) and 0.0 <= saved['target'] <= 1.0
    runs = [json.loads(p.read_text()) for p in sorted((out / 'runs').glob('*.json'))]
    assert len(runs) == len(saved['rows']) >= 5, 'one run per configuration (one seed in --quick)'
    assert set(saved['rows']) == {run['name'] for run in runs}
    for run in runs:
        curve = run['curve']
        assert len(curve) >= 3
        for point in curve:
            assert all(math.isfinite(v) for v in point.values()), point
            assert 0.0 <= point['zero_shot'] <= 1.0 and 0.0 <= point['i2t_r1'] <= 1.0
        for key in ('step', 'examples_trained', 'examples_seen', 'flops'):
            xs = [p[key] for p in curve]
            assert all(b > a for a, b in zip(xs, xs[1:])), (run['name'], key, xs)
        last = curve[-1]
        steps, b = settings['steps'], settings['batch_size']
        assert last['examples_trained'] == steps * b == steps * run['subbatch']
        assert last['examples_seen'] == steps * run['superbatch']
        if run['spec']['kind'] == 'jest':
            assert last['flops_scoring'] > 0


def test_oracle_is_clean_and_jest_filters_noise(quick_results):
    out, _ = quick_results
    runs = {p.stem: json.loads(p.read_text()) for p in (out / 'runs').glob('*.json')}
    assert runs['oracle_seed0']['pool_clean_fraction'] == 1.0
    assert runs['uniform_seed0']['pool_clean_fraction'] < 0.7
    jest = runs['jest-0.8_seed0']['selection']
    assert jest['selected']['clean'] > jest['superbatch']['clean']
    fast = runs['jest-0.8-fast_seed0']
    # flexi + cached + multi-resolution: cheaper per step than live full-resolution scoring
    assert fast['curve'][-1]['flops'] < runs['jest-0.8_seed0']['curve'][-1]['flops']
