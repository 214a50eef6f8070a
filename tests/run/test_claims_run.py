"""README claims about the yaml runner: data sources come in through the ``composer_jest_data_sources`` entry-point
group; ``progress_bar: true|false`` forces Composer's progress bar (null: only on a terminal)."""

from __future__ import annotations

import importlib.metadata as md

import catalogue
import pytest
from composer.loggers import ProgressBarLogger

from composer_jest.run import registry
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config

QUICK = ['eval_loader=null', 'algorithms.jest.score=hard_learner', 'algorithms.jest.reference=null', 'max_duration=1ba']


def test_a_data_source_comes_in_through_the_entry_point_group(monkeypatch):
    # what `[project.entry-points.composer_jest_data_sources] my_shapes = "..."` in another package gives
    ep = md.EntryPoint(name='my_shapes', value='composer_jest.data.sources:shapes_source',
                       group='composer_jest_data_sources')
    monkeypatch.setattr(catalogue, 'AVAILABLE_ENTRY_POINTS', md.EntryPoints([ep]))
    assert 'my_shapes' in registry.names(registry.data_sources)
    trainer = build_trainer(load_config('yamls/quickstart.yaml', [
        *QUICK, 'train_loader={source: my_shapes, num_samples: 256, seed: 3}']))
    batch = next(iter(trainer.state.train_dataloader))
    assert batch['image'].shape[0] == 128  # global_train_batch_size 32 at f = 0.75: the super-batch
    # another group does not count
    monkeypatch.setattr(catalogue, 'AVAILABLE_ENTRY_POINTS', md.EntryPoints([md.EntryPoint(
        name='my_shapes', value=ep.value, group='composer_jest_algorithms')]))
    assert 'my_shapes' not in registry.names(registry.data_sources)


@pytest.mark.parametrize('setting, shown', [('true', True), ('false', False), ('null', False)])
def test_progress_bar_setting(setting, shown):
    """``null`` shows the bar only when stderr is a terminal (under pytest it is not)."""
    trainer = build_trainer(load_config('yamls/quickstart.yaml', [*QUICK, f'progress_bar={setting}']))
    bars = [d for d in trainer.logger.destinations if isinstance(d, ProgressBarLogger)]
    assert bool(bars) == shown
