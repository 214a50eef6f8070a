"""Durations in trained examples: uniform and JEST runs are compared at equal trained examples by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from composer_jest.run.config import load_config
from composer_jest.run.quickstart import RECIPES, run_stage

YAMLS = sorted(RECIPES.glob('*.yaml'))


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: p.stem)
def test_every_recipe_counts_its_duration_in_batches(path: Path):
    """Composer's `ep`/`sp` count the streamed super-batches under JEST; a step trains the same b either way."""
    raw = OmegaConf.load(path)
    for key in ('max_duration', 'eval_interval', 'save_interval'):
        if key in raw:
            assert str(raw[key]).endswith('ba'), f'{path.name}: {key}={raw[key]}'


def test_max_examples_trained_sets_the_duration_in_batches():
    cfg = load_config(RECIPES / 'quickstart.yaml', ['max_examples_trained=4800', 'max_duration=3ep'])
    assert cfg.max_duration == '150ba'
    with pytest.raises(ValueError, match='max_examples_trained=100 must be a positive multiple of '
                                         'global_train_batch_size=32'):
        load_config(RECIPES / 'quickstart.yaml', ['max_examples_trained=100'])


def test_uniform_and_jest_train_the_same_examples():
    """With max_examples_trained both train exactly 96 examples (3 steps of 32); JEST streams 4x as many."""
    common = ['max_examples_trained=96', 'eval_loader=null', 'metrics_file=null', 'eval_summary=false',
              'print_metrics=false']
    uniform, _ = run_stage('uniform', RECIPES / 'quickstart_uniform.yaml', common)
    jest, trainer = run_stage('jest', RECIPES / 'quickstart.yaml',
                              [*common, 'algorithms.jest.score=hard_learner', 'algorithms.jest.reference=null'])
    assert uniform.examples_trained == jest.examples_trained == 96
    assert (uniform.examples_seen, jest.examples_seen) == (96, 384)
    assert int(trainer.state.timestamp.sample) == 384  # Composer's sample counter: the super-batches
