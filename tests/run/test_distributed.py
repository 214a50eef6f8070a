"""Two gloo processes on the CPU with FSDP2, launched the way users launch: `composer -n 2 -m composer_jest.train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from composer import Trainer
from model_helpers import make_model
from s3_server import moto_server, s3_endpoint, streaming_shm  # noqa: F401  (pytest fixtures)

from composer_jest.data.convert import MDSOptions, convert_shapes

COMPOSER = Path(sys.executable).parent / 'composer'


def yaml_text(tmp: Path, reference: Path, scope: str, train_loader: str) -> str:
    return f"""
run_name: dist-{scope}
model: {{name: jest-tiny, classnames: shapes}}
train_loader: {train_loader}
eval_loader: {{source: shapes, num_samples: 64, seed: 99}}
global_train_batch_size: 16
max_duration: 4ba
eval_interval: 4ba
algorithms:
  jest: {{reference: {reference}, filter_ratio: 0.5, n_chunks: 4, scope: {scope}, seed: 3}}
callbacks:
  selection_log: {{folder: {tmp}/selections}}
parallelism_config: {{fsdp: {{}}}}
save_folder: {tmp}/checkpoints
save_interval: 2ba
save_overwrite: true
log_to_console: false
print_metrics: false
"""


def launch(workdir: Path, yaml: Path, *overrides: str, env: dict | None = None) -> None:
    cmd = [str(COMPOSER), '-n', '2', '--stdout', str(workdir / 'rank{rank}.out'), '--stderr',
           str(workdir / 'rank{rank}.err'), '-m', 'composer_jest.run.train', str(yaml), *overrides]
    full_env = {**os.environ, 'FSDP_VERSION': '2', **(env or {})}
    for _attempt in range(2):
        proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=600)
        logs = ''.join(p.read_text()[-3000:] for p in sorted(workdir.glob('rank*.err')))
        # The launcher picks a free port, then the ranks bind it: on a busy machine another process can take it
        # in between, and gloo fails while connecting, before any training. Only that is retried.
        if proc.returncode == 0 or 'DistNetworkError' not in logs or 'init_process_group' not in logs:
            break
    if proc.returncode != 0:
        if 'DistNetworkError' in logs and 'init_process_group' in logs:
            pytest.fail(f'composer -n 2 could not connect its ranks twice (the launcher\'s free port was taken by '
                        f'another process before the ranks bound it; rerun on a less busy machine):\n{logs}')
        pytest.fail(f'composer -n 2 failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}')


def selections(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f'selection-rank{rank}.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def reference_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('dist-ref') / 'reference.pt'
    Trainer(model=make_model(seed=5), max_duration='1ba', progress_bar=False).save_checkpoint(str(path))
    return path


TRAIN_SHAPES = '{source: shapes, num_samples: 2048, noise: 0.5, seed: 2}'


@pytest.mark.slow  # two `composer -n 2` launches from moto S3 (~2 min): run by .ci/run after the suite (`-m slow`)
def test_global_selection_from_s3_is_identical_on_all_ranks_and_resumes_exactly(tmp_path, reference_checkpoint,
                                                                                s3_endpoint):
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=512, noise=0.5, seed=2, options=MDSOptions(size_limit=1 << 16, progress=False))
    train_loader = f'{{source: mds, remote: "{remote}", local: "{tmp_path}/cache", shuffle_seed: 7}}'
    yaml = tmp_path / 'run.yaml'
    yaml.write_text(yaml_text(tmp_path, reference_checkpoint, 'global', train_loader))
    launch(tmp_path, yaml)
    full = [selections(tmp_path / 'selections', r) for r in (0, 1)]
    assert [s['step'] for s in full[0]] == [0, 1, 2, 3]
    for step0, step1 in zip(*full):
        assert step0['global_indices'] == step1['global_indices']        # same global draw on every rank
        g = step0['global_indices']
        assert len(g) == 16 and len(set(g)) == 16
        assert sum(i < 16 for i in g) == 8                               # per-rank quota: b / world = 8 each
        assert len(step0['index']) == len(step1['index']) == 8
        assert not set(step0['index']) & set(step1['index'])            # each rank trains its own examples

    # Resume from the sharded checkpoint at batch 2: the same selections and the same losses follow.
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    launch(resumed, yaml, f'load_path={tmp_path}/checkpoints/ep0-ba2', f'save_folder={resumed}/checkpoints',
           f'callbacks.selection_log.folder={resumed}/selections', f'train_loader.local={resumed}/cache')
    for rank in (0, 1):
        after = selections(resumed / 'selections', rank)
        assert [s['step'] for s in after] == [2, 3]
        for got, expected in zip(after, full[rank][2:]):
            assert got['global_indices'] == expected['global_indices']
            assert got['index'] == expected['index']
            assert got['loss'] == pytest.approx(expected['loss'], rel=1e-5)


def test_local_selection_draws_independently_per_rank(tmp_path, reference_checkpoint):
    yaml = tmp_path / 'run.yaml'
    yaml.write_text(yaml_text(tmp_path, reference_checkpoint, 'local', TRAIN_SHAPES).replace('4ba', '2ba'))
    # Flexi scoring and multi-resolution training through the FSDP2-wrapped towers. At temperature 1e6 the scores
    # (O(10)) move the logits by ~1e-5, far less than the Gumbel noise between neighbours: the picks are the noise's
    # top 8 of 16. One seed shared by the ranks would then draw the same positions on both at every step (the data
    # differ, the noise would not); rank-aware seeds draw the same 8 positions with probability 1 / C(16, 8) ~ 8e-5.
    launch(tmp_path, yaml, 'algorithms.jest.learner_patch_size=16', 'model.low_res_patch_size=16',
           'algorithms.jest.temperature=1e6')
    ranks = [selections(tmp_path / 'selections', r) for r in (0, 1)]
    assert [s['step'] for s in ranks[0]] == [s['step'] for s in ranks[1]] == [0, 1]
    for step0, step1 in zip(*ranks):
        assert len(step0['global_indices']) == len(step1['global_indices']) == 8  # local draw: 8 of 16
        assert len(step0['index']) == 8
        assert 0 < step0['loss'] < 100 and 0 < step1['loss'] < 100
        # rank-aware seeds: the two ranks' noise differs, so their positions differ at every step
        assert sorted(step0['global_indices']) != sorted(step1['global_indices']), (step0, step1)
