"""The compute study (issue 26): its analysis arithmetic on hand-made curves, and ``--quick`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / 'benchmarks' / 'compute_study.py'
sys.path.insert(0, str(REPO / 'benchmarks'))


def _run(kind: str, flops_per_step: float, accs: list[float], cpu_per_step: float = 1.0, base_steps: int = 4) -> dict:
    """A saved run: evaluations every step, ``examples_trained`` = 10 per step."""
    curve = [{'step': i, 'examples_trained': 10 * i, 'examples_seen': 10 * i, 'flops': flops_per_step * i,
              'cpu': cpu_per_step * i, 'zero_shot': a, 'i2t_r1': a / 2, 't2i_r1': a / 2} for i, a in enumerate(accs)]
    return {'spec': {'kind': kind}, 'uses_reference': kind in ('offline', 'jest'), 'seed': 0, 'superbatch': 10,
            'steps': len(accs) - 1, 'base_steps': base_steps,
            'curve': curve, 'selection': {}, 'pool_clean_fraction': 0.5}


def test_analysis_to_match_and_equal_flops_with_and_without_one_off_costs():
    from compute_study_analysis import analyse

    # smooth() is a centred 3-point mean: flat stretches stay flat, so the numbers below are exact.
    uniform = _run('uniform', 1.0, [0.0, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4], base_steps=6)  # smoothed final 0.4 at 6 FLOPs
    jest = _run('jest', 1.5, [0.0, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4], base_steps=6)
    offline = _run('offline', 1.0, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], base_steps=6)
    ref = {'train_flops': 1.2, 'embed_flops': 0.3, 'train_cpu': 0.6, 'embed_cpu': 0.0, 'final': {'zero_shot': 0.3}}
    res = analyse({'uniform': [uniform], 'jest-x': [jest], 'offline-x': [offline]}, ref)
    assert res['target'] == pytest.approx(0.4) and res['budget']['flops'] == pytest.approx(6.0)
    row = res['rows']['jest-x']['agg']
    # smoothed jest curve: [0.2, 0.267, 0.4, ...] reaches 0.4 at step 2 = 3 FLOPs = 0.5x uniform's 6
    assert row['flops_to_match']['mean'] == pytest.approx(0.5)
    assert row['flops_to_match_all']['mean'] == pytest.approx((3.0 + 1.5) / 6.0)  # + reference + embedding
    assert row['cpu_to_match']['mean'] == pytest.approx(2.0 / 6.0)  # cpu 1/step, budget 6
    assert row['cpu_to_match_all']['mean'] == pytest.approx(2.6 / 6.0)
    assert row['examples_trained_to_match']['mean'] == pytest.approx(20 / 60)
    assert row['at_flops']['mean'] == pytest.approx(0.4)  # read at 6 FLOPs (step 4), inside the curve
    assert row['at_flops_all']['mean'] == pytest.approx(0.4)  # at 6 - 1.5 = 4.5 FLOPs (step 3)
    assert row['final']['mean'] == pytest.approx(0.4)
    off = res['rows']['offline-x']['agg']
    assert off['flops_to_match']['mean'] is None and off['flops_to_match']['of'] == 1  # never reached
    uni = res['rows']['uniform']['agg']  # uniform pays no one-off cost
    assert uni['flops_to_match_all']['mean'] == uni['flops_to_match']['mean']
    assert res['one_off_vs_budget']['flops'] == pytest.approx(1.5 / 6.0)


def test_analysis_reads_final_at_the_base_step_of_a_longer_run():
    from compute_study_analysis import analyse

    uniform = _run('uniform', 1.0, [0.0, 0.2, 0.2, 0.2, 0.2], base_steps=4)
    longer = _run('jest', 0.5, [0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9], base_steps=4)  # 8 steps = 4 FLOPs
    ref = {'train_flops': 0.0, 'embed_flops': 0.0, 'train_cpu': 0.0, 'embed_cpu': 0.0, 'final': {'zero_shot': 0.}}
    row = analyse({'uniform': [uniform], 'jest-x': [longer]}, ref)['rows']['jest-x']['agg']
    assert row['final']['mean'] == pytest.approx(0.1)  # step 4, not the jump at step 8
    assert row['at_flops']['mean'] == pytest.approx(0.5)  # at 4 FLOPs = step 8: mean(0.1, 0.9)


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    """``compute_study.py --quick`` as a user runs it (a subprocess), then ``--analyse-only`` on its runs."""
    out, cache = tmp_path_factory.mktemp('cs_out'), tmp_path_factory.mktemp('cs_cache')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, str(SCRIPT), '--quick', '--out', str(out), '--cache', str(cache)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f'--quick exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}'
    first = (out / 'compute_study.json').read_text()
    again = subprocess.run(cmd + ['--analyse-only'], cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-4000:]
    return out, json.loads(first), json.loads((out / 'compute_study.json').read_text())


@pytest.mark.slow  # ~75 s of CPU: run by .ci/run after the suite (`pytest -m slow`)
def test_quick_runs_every_kind_and_analyse_only_reproduces_the_tables(quick):
    out, first, again = quick
    assert first == again  # --analyse-only regenerated the same numbers from the saved runs, without training
    runs = {p.stem: json.loads(p.read_text()) for p in (out / 'runs' / 'proportional' / 'dev').glob('*.json')}
    assert set(runs) == {'uniform_seed0', 'offline-0.5_seed0', 'jest-0.8-all_seed0', 'uniform-distill_seed0'}
    # the distilled row trains on the cached reference columns: it pays the one-off reference costs, uniform does not
    assert [runs[f'{m}_seed0']['uses_reference'] for m in ('uniform', 'uniform-distill')] == [False, True]
    assert runs['uniform-distill_seed0']['spec']['loss'] == {'name': 'distill', 'form': 'sigmoid', 'distill': 1.0}
    pool = runs['uniform_seed0']['pool_size']
    assert runs['offline-0.5_seed0']['pool_size'] == pool // 2  # the top half by the reference's CLIP score
    jest = runs['jest-0.8-all_seed0']
    assert jest['superbatch'] == 5 * jest['subbatch']  # N = b / (1 - 0.8)
    for run in runs.values():
        xs = [[p[k] for p in run['curve']] for k in ('flops', 'cpu', 'examples_trained')]
        assert all(x == sorted(x) and x[-1] > 0 for x in xs)
    res = first['proportional/dev']
    # every curve reaches uniform's FLOP budget, so accuracy at equal FLOPs is read, never extrapolated
    assert all(r['agg']['at_flops']['n'] == 1 for r in res['rows'].values())
    assert (out / 'curves_proportional_dev.png').stat().st_size > 0
    assert '| jest-0.8-all |' in (out / 'compute_study.md').read_text()


def test_paired_difference_matches_seeds_not_positions():
    from compute_study_analysis import analyse, paired

    def seeded(kind, seed, level):
        return dict(_run(kind, 1.0, [level] * 5), seed=seed)

    runs = {'uniform': [seeded('uniform', 0, 0.2), seeded('uniform', 1, 0.3)],
            # saved in the other order, and with a seed uniform lacks: only seeds 0 and 1 pair up
            'jest-x': [seeded('jest', 2, 0.9), seeded('jest', 1, 0.5), seeded('jest', 0, 0.3)]}
    ref = {'train_flops': 0.0, 'embed_flops': 0.0, 'train_cpu': 0.0, 'embed_cpu': 0.0, 'final': {'zero_shot': 0.}}
    d = paired(analyse(runs, ref), 'jest-x', 'uniform')
    assert d['n'] == 2 and d['mean'] == pytest.approx(0.15)  # (0.3 - 0.2 + 0.5 - 0.3) / 2
    assert d['std'] == pytest.approx(0.0707, abs=1e-4)
    assert paired(analyse(runs, ref), 'jest-x', 'missing')['n'] == 0


def test_noise_pools_take_the_dev_pools_best_rows():
    from compute_study import METHODS, STEERING, best_jest, best_steered, plan

    uniform = _run('uniform', 1.0, [0.0, 0.1, 0.2, 0.2, 0.2], base_steps=4)  # target 0.2, budget 4 FLOPs
    runs = {'uniform': [uniform],
            'jest-0.8-all': [_run('jest', 1.0, [0.0, 0.1, 0.2, 0.2, 0.2])],  # matches at 2.67 FLOPs (smoothed)
            'jest-0.5-all': [_run('jest', 1.0, [0.0, 0.2, 0.2, 0.2, 0.2])],  # at 1.5: the best plain JEST
            'jest-0.8-all-distill': [_run('jest', 1.0, [0.0, 0.3, 0.3, 0.3, 0.3])],  # better, but not plain JEST
            'drrho': [_run('uniform', 1.0, [0.0, 0.1, 0.1, 0.1, 0.1])],
            'uniform-distill': [_run('uniform', 1.0, [0.0, 0.2, 0.4, 0.4, 0.4])]}
    assert best_jest(runs) == 'jest-0.5-all'
    assert best_steered(runs) == ['uniform-distill', 'jest-0.8-all-distill']  # ranked at uniform's FLOPs
    jobs = plan('steering-noise', [0, 1], best_steered(runs))
    assert len(jobs) == 12 and {(pool, m) for _, pool, m, _ in jobs} == {
        (pool, m) for pool in ('bad10', 'bad70', 'dups') for m in ('uniform-distill', 'jest-0.8-all-distill')}
    noise = plan('noise', [0], [best_jest(runs)])
    assert {m for _, _, m, _ in noise} == {'uniform', 'jest-0.5-all', 'offline-0.5', 'offline-0.2'}
    # every steered row needs the reference; only the pure selection rows are plain JEST
    assert all(METHODS[m].uses_reference and not METHODS[m].plain_jest for m in STEERING)
    assert METHODS['jest-0.8-all'].plain_jest and not METHODS['uniform'].uses_reference


def test_subpool_has_the_requested_noise_and_size():
    import numpy as np
    from compute_study import subpool
    from learning_efficiency import KIND_CODES

    kind = np.array([KIND_CODES['clean']] * 60 + [KIND_CODES['near_duplicate']] * 20 + [KIND_CODES['mismatched']] * 25
                    + [KIND_CODES['junk']] * 15)
    data = {'pool': {'kind': kind}}
    assert subpool(data, None, 10) is None  # the dev pool itself
    for bad, size in ((0.1, 50), (0.7, 50), (0.0, 80)):
        ids = subpool(data, bad, size)
        assert len(ids) == size and len(set(ids.tolist())) == size and list(ids) == sorted(ids)
        k = kind[ids]
        assert ((k == KIND_CODES['mismatched']) | (k == KIND_CODES['junk'])).sum() == round(bad * size)
    assert list(subpool(data, 0.1, 50, seed=3)) == list(subpool(data, 0.1, 50, seed=3))
    with pytest.raises(ValueError, match='needs 49 bad'):
        subpool(data, 0.7, 70)  # 40 bad pairs only
