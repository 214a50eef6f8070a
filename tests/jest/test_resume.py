"""Resume that is exact (one process): epoch-boundary checkpoints, counters, logs that survive, refused resumes.

A run is killed (an exception after a step, as a crash would) and ``autoresume`` continues it from its save
folder; the data order, the JEST draws, the losses and the final weights must equal a run that never failed.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import DecoupledAdamW
from model_helpers import make_model
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest import JEST
from composer_jest.data.convert import MDSOptions, convert_shapes
from composer_jest.data.streaming import build_streaming_dataloader
from composer_jest.jest.callbacks import SelectionLog
from composer_jest.run.console import metrics_file_logger

POOL = 64  # examples per epoch: 4 super-batches of 16


@pytest.fixture(scope='module')
def shards(tmp_path_factory, streaming_shm) -> str:  # noqa: F811
    out = str(tmp_path_factory.mktemp('pool') / 'mds')
    convert_shapes(out, num_samples=POOL, noise=0.5, seed=2, options=MDSOptions(size_limit=4_000, progress=False))
    return out


class Killed(RuntimeError):
    """The crash a test injects."""


class Record(Callback):
    """Per step: the super-batch, the trained indices, JEST's draw and the loss; raises :class:`Killed` after
    step ``kill_after`` (1-based), like a process that dies there."""

    def __init__(self, kill_after: int = 0):
        self.trained: list[list[int]] = []
        self.draws: list[list[int]] = []
        self.losses: list[torch.Tensor] = []
        self.kill_after = kill_after

    def after_dataloader(self, state, logger) -> None:
        jest = next(a for a in state.algorithms if isinstance(a, JEST))
        self.trained.append(state.batch['index'].tolist())
        self.draws.append(jest.last_global_indices.tolist())

    def batch_end(self, state, logger) -> None:
        self.losses.append(state.loss.detach().clone())
        if self.kill_after and int(state.timestamp.batch) == self.kill_after:
            raise Killed(f'killed after step {self.kill_after}')


def _run(shards: str, cache: str, record: Record, duration: str = '2ep', logs: str = '', **kwargs) -> Trainer:
    """jest-tiny, a streamed and shuffled pool, hard_learner selection (a seeded draw every step); with ``logs``, the
    yaml runs' metrics file and selection log are written under it."""
    model = make_model(seed=1)
    loader = build_streaming_dataloader(shards, cache, model.tokenizer, batch_size=16, shuffle_seed=7)
    callbacks = [record] + ([SelectionLog(f'{logs}/selections')] if logs else [])
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=duration, seed=0, device='cpu',
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), callbacks=callbacks,
                      algorithms=[JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2, seed=0)],
                      loggers=[metrics_file_logger(f'{logs}/metrics-rank{{rank}}.txt')] if logs else [],
                      progress_bar=False, log_to_console=False, **kwargs)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope='module')
def boundary(shards, tmp_path_factory) -> dict:
    """An uninterrupted 2-epoch run, and the same run killed after step 6 then autoresumed from ``ep1-ba4``
    (``save_interval: 1ep``, the config default), each with its metrics file and selection log."""
    tmp = tmp_path_factory.mktemp('boundary')
    full, resumed = Record(), Record()
    uninterrupted = _run(shards, str(tmp / 'cache-a'), full, logs=str(tmp / 'full'))
    save = dict(save_folder=str(tmp / 'ckpt'), save_interval='1ep', run_name='boundary', autoresume=True)
    killed = Record(kill_after=6)
    with pytest.raises(Killed):
        _run(shards, str(tmp / 'cache-b'), killed, logs=str(tmp / 'resumed'), **save)
    assert (tmp / 'ckpt' / 'ep1-ba4-rank0.pt').is_file() and len(killed.losses) == 6
    trainer = _run(shards, str(tmp / 'cache-c'), resumed, logs=str(tmp / 'resumed'), **save)
    return {'full': full, 'resumed': resumed, 'killed': killed, 'tmp': tmp,
            'weights': (trainer.state.model.state_dict(), uninterrupted.state.model.state_dict())}


def test_epoch_boundary_checkpoint_resumes_exactly(boundary):
    """Resumed from ``ep1-ba4``: epoch 1's order, the same draws and losses, bit-equal weights at the end (streaming
    replayed epoch 0's order before the fix, and every later step differed)."""
    full, resumed = boundary['full'], boundary['resumed']
    assert len(resumed.trained) == 4, 'steps 5-8 run again from the epoch-boundary checkpoint'
    assert resumed.trained == full.trained[4:], 'epoch 1 order (not epoch 0 replayed)'
    assert resumed.draws == full.draws[4:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.losses, full.losses[4:], strict=True))
    weights, expected = boundary['weights']
    assert all(torch.equal(weights[k], expected[k]) for k in expected), 'bit-equal weights on the CPU'


def _metric(path, name: str) -> dict[int, str]:
    """``{batch: value}`` of one metric in a metrics file; a batch logged twice fails."""
    values: dict[int, str] = {}
    for line in path.read_text().splitlines():
        head, _, rest = line.partition(']: ')
        if head.startswith('[metric][batch=') and rest.startswith(f'{name}: '):
            batch = int(head[len('[metric][batch='):])
            assert batch not in values, f'{name} at batch {batch} is in {path.name} twice'
            values[batch] = rest[len(name) + 2:].strip()
    return values


def test_metrics_file_keeps_the_history_across_autoresume(boundary):
    """The resumed run's metrics file holds every step once (the killed attempt's steps 1-4 from its checkpoint,
    steps 5-8 from the resumed run) with the uninterrupted run's values; it held only steps 5-8 before."""
    full = _metric(boundary['tmp'] / 'full' / 'metrics-rank0.txt', 'loss/train/total')
    resumed = _metric(boundary['tmp'] / 'resumed' / 'metrics-rank0.txt', 'loss/train/total')
    assert sorted(full) == list(range(8))
    assert resumed == full
    seen = _metric(boundary['tmp'] / 'resumed' / 'metrics-rank0.txt', 'jest/examples_seen')
    assert seen == {k: str(16 * (k + 1)) for k in range(8)}, 'counters continue from the checkpoint'


def test_selection_log_keeps_each_step_once(boundary):
    """Steps 5 and 6 ran in the killed attempt after its last checkpoint and again after the resume: the log
    holds them once, as the resumed run drew them (the same as the uninterrupted run's)."""
    def records(folder):
        return [json.loads(line) for line in (folder / 'selections' / 'selection-rank0.jsonl').read_text().splitlines()]

    full, resumed = records(boundary['tmp'] / 'full'), records(boundary['tmp'] / 'resumed')
    assert [r['step'] for r in resumed] == list(range(8))
    assert [r['index'] for r in resumed] == [r['index'] for r in full]
    assert [r['global_indices'] for r in resumed] == [r['global_indices'] for r in full]


def test_resume_with_another_filter_ratio_is_refused():
    """Checked at fit start, against the loader's super-batch: the error names both ratios (a warning named the
    change, and the run went on with the new ratio, before)."""
    saved = JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2).state_dict()
    jest = JEST(score='hard_learner', filter_ratio=0.75, n_chunks=2)
    with pytest.warns(UserWarning, match=r'filter_ratio: 0\.5 -> 0\.75'):
        jest.load_state_dict(saved)
    loader = SimpleNamespace(batch_size=32)
    with pytest.raises(ValueError, match=r'filter_ratio 0\.5, this run has filter_ratio 0\.75'):
        jest._resume.fit_start(loader, jest.subbatch_size, jest.filter_ratio)
