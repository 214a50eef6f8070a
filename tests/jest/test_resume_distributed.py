"""Resume across processes: 2 -> 2 keeps every rank's selection stream, 2 -> 1 and 1 -> 2 keep the counters and
stream each step's examples as the union of the old ranks' super-batches; another global batch is refused.

One launch (``composer -n 2``, gloo on the CPU) runs three yamls in order: an uninterrupted 2-rank run saving at
batch 2, its resume on 2 ranks, and a 2-rank resume of a 1-rank run's checkpoint. The 1-rank runs are in process.
Every run streams the same shuffled MDS pool; JEST draws every step (``hard_learner``, local scope).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest.data.convert import MDSOptions, convert_shapes
from composer_jest.run.train import run

COMPOSER = Path(sys.executable).parent / 'composer'
STEPS, GLOBAL_BATCH = 4, 16  # f = 0.5: the global super-batch is 32 on any number of ranks


def write_yaml(tmp: Path, name: str, shards: str, load: str | None = None, batch: int = GLOBAL_BATCH) -> Path:
    out = tmp / name
    text = f"""
run_name: {name}
seed: 5
model: {{name: jest-tiny}}
train_loader: {{source: mds, remote: "{shards}", local: "{out}/cache", shuffle_seed: 7}}
eval_loader: null
global_train_batch_size: {batch}
max_duration: {STEPS}ba
algorithms:
  jest: {{score: hard_learner, filter_ratio: 0.5, n_chunks: 2, seed: 3}}
callbacks:
  selection_log: {{folder: "{out}/selections", superbatch: true}}
save_folder: "{out}/checkpoints"
save_interval: 2ba
metrics_file: "{out}/metrics-rank{{rank}}.txt"
load_path: {f'"{load}"' if load else 'null'}
eval_summary: false
print_metrics: false
"""
    path = tmp / f'{name}.yaml'
    path.write_text(text)
    return path


def checkpoint(tmp: Path, name: str) -> str:
    return str(tmp / name / 'checkpoints' / 'ep0-ba2-rank0.pt')


def selections(tmp: Path, name: str, rank: int) -> list[dict]:
    lines = (tmp / name / 'selections' / f'selection-rank{rank}.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


def last_metric(tmp: Path, name: str, metric: str) -> int:
    lines = (tmp / name / 'metrics-rank0.txt').read_text().splitlines()
    values = [line.rsplit(': ', 1)[1] for line in lines if line.endswith(' ') and f']: {metric}: ' in line]
    return int(float(values[-1]))


def launch(tmp: Path, *yamls: Path) -> str:
    """``composer -n 2 -m composer_jest.train`` over the yamls in order; returns rank 0's output (the launcher's)."""
    cmd = [str(COMPOSER), '-n', '2', '--stdout', str(tmp / 'rank{rank}.out'), '--stderr', str(tmp / 'rank{rank}.err'),
           '-m', 'composer_jest.run.train', *map(str, yamls)]
    for _attempt in range(2):
        proc = subprocess.run(cmd, cwd=tmp, env=dict(os.environ), capture_output=True, text=True, timeout=600)
        logs = ''.join(p.read_text()[-3000:] for p in sorted(tmp.glob('rank*.err')))
        # a free port taken between the launcher's pick and the ranks' bind fails in init_process_group: retried
        if proc.returncode == 0 or 'DistNetworkError' not in logs or 'init_process_group' not in logs:
            break
    if proc.returncode != 0:
        pytest.fail(f'composer -n 2 failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}')
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def runs(tmp_path_factory, streaming_shm) -> dict:  # noqa: F811
    tmp = tmp_path_factory.mktemp('elastic')
    shards = str(tmp / 'mds')
    convert_shapes(shards, num_samples=256, noise=0.5, seed=2, options=MDSOptions(size_limit=8_000, progress=False))
    run(write_yaml(tmp, 'one', shards), [])  # 1 rank, uninterrupted, saves at batch 2
    err = launch(tmp, write_yaml(tmp, 'two', shards), write_yaml(tmp, 'two-two', shards, checkpoint(tmp, 'two')),
                 write_yaml(tmp, 'one-two', shards, checkpoint(tmp, 'one')))
    return {'tmp': tmp, 'shards': shards, 'err': err}


def test_two_to_two_local_scope_keeps_every_rank_stream(runs):
    """Each rank draws as in the uninterrupted run after the resume (rank 1 drew with rank 0's stream before)."""
    tmp = runs['tmp']
    full = [selections(tmp, 'two', rank)[2:] for rank in (0, 1)]
    resumed = [selections(tmp, 'two-two', rank) for rank in (0, 1)]
    for rank in (0, 1):
        assert [r['step'] for r in resumed[rank]] == [2, 3]
        for got, expected in zip(resumed[rank], full[rank], strict=True):
            assert got['superbatch'] == expected['superbatch']
            assert got['global_indices'] == expected['global_indices'], f'rank {rank} step {got["step"]}'
            assert got['index'] == expected['index']
    for got, expected in zip(resumed[0] + resumed[1], full[0] + full[1], strict=True):  # the loss sees both ranks
        assert got['loss'] == pytest.approx(expected['loss'], rel=1e-5)
    assert selections(tmp, 'two', 0)[0]['global_indices'] != selections(tmp, 'two', 1)[0]['global_indices']


def _union(tmp: Path, name: str, ranks: tuple[int, ...], step: int) -> set[int]:
    return {i for r in ranks for i in selections(tmp, name, r)[step]['superbatch']}


def test_two_to_one_keeps_counters_and_streams_the_union(runs, caplog):
    tmp = runs['tmp']
    with caplog.at_level(logging.WARNING, logger='composer_jest'):
        run(write_yaml(tmp, 'two-one', runs['shards'], checkpoint(tmp, 'two')), [])
    assert 'resuming a checkpoint written by 2 rank(s) on 1' in caplog.text
    resumed = selections(tmp, 'two-one', 0)
    assert [r['step'] for r in resumed] == [2, 3]
    for record in resumed:
        assert len(record['superbatch']) == 32 and len(record['index']) == 16
        assert set(record['superbatch']) == _union(tmp, 'two', (0, 1), record['step'])
    assert last_metric(tmp, 'two-one', 'jest/examples_seen') == STEPS * 32
    assert last_metric(tmp, 'two-one', 'jest/examples_trained') == STEPS * GLOBAL_BATCH


def test_one_to_two_keeps_counters_and_streams_the_union(runs):
    tmp = runs['tmp']
    assert 'resuming a checkpoint written by 1 rank(s) on 2' in runs['err']
    for step in (2, 3):
        assert _union(tmp, 'one-two', (0, 1), step - 2) == set(selections(tmp, 'one', 0)[step]['superbatch'])
    assert last_metric(tmp, 'one-two', 'jest/examples_seen') == STEPS * 32
    assert last_metric(tmp, 'one-two', 'jest/examples_trained') == STEPS * GLOBAL_BATCH


def test_resume_with_another_global_batch_is_refused(runs):
    tmp = runs['tmp']
    with pytest.raises(ValueError, match=r'global batch 16 \(1 rank\(s\) x 16.*this run has global batch 32 '):
        run(write_yaml(tmp, 'refused', runs['shards'], checkpoint(tmp, 'one'), batch=32), [])
