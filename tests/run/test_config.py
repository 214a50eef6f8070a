"""Yaml configs: every recipe builds, and bad configs fail before training with the field's name."""

from __future__ import annotations

import re
from pathlib import Path

import catalogue
import pytest
import torch

from composer_jest.run import registry
from composer_jest.run.builders import build_trainer, dry_run, per_rank_batch_sizes
from composer_jest.run.config import load_config

YAMLS = sorted((Path(__file__).parents[2] / 'yamls').glob('*.yaml'))


def test_every_recipe_is_documented_in_the_readme():
    readme = (Path(__file__).parents[2] / 'README.md').read_text()
    start = readme.index('Recipes:')
    documented = set(re.findall(r'`(\w+)`', readme[start:readme.index('\n\n', start)]))
    assert {p.stem for p in YAMLS} <= documented, sorted({p.stem for p in YAMLS} - documented)


@pytest.mark.parametrize('path', YAMLS, ids=lambda p: p.stem)
def test_every_yaml_builds_what_it_says(path):
    cfg = load_config(path)
    built = dry_run(cfg, world_size=1)
    assert built['model'].loss_name == cfg.model.loss
    assert built['optimizer'].param_groups[0]['lr'] == cfg.optimizer.lr
    assert built['b'] == cfg.global_train_batch_size
    jest = cfg.algorithms.get('jest')
    if jest is None:
        assert built['N'] == built['b'] and not any(type(a).__name__ == 'JEST' for a in built['algorithms'])
        return
    algorithm = built['algorithms'][0]
    assert type(algorithm).__name__ == 'JEST'  # JEST first
    assert (algorithm.filter_ratio, algorithm.n_chunks, algorithm.score, algorithm.scope) == \
        (jest.filter_ratio, jest.n_chunks, jest.score, jest.get('scope', 'local'))
    assert built['N'] == round(built['b'] / (1 - jest.filter_ratio))


def test_quickstart_builds_a_trainer_with_jest_first(tmp_path):
    cfg = load_config('yamls/quickstart.yaml', [
        f'algorithms.jest.reference={tmp_path / "ref.pt"}', 'algorithms.gradient_clipping.clipping_type=norm',
        'algorithms.gradient_clipping.clipping_threshold=1.0', 'max_duration=1ba',
    ])
    from composer import Trainer

    Trainer(model=dry_run(cfg)['model'], max_duration='1ba', progress_bar=False).save_checkpoint(
        str(tmp_path / 'ref.pt'))
    trainer = build_trainer(cfg)
    names = [type(a).__name__ for a in trainer.state.algorithms]
    assert 'GradientClipping' in names
    # Composer's engine decides the run order: JEST must swap the batch before anything else sees it.
    from composer.core import Event
    order = trainer.engine._compile(trainer.state.algorithms, Event.AFTER_DATALOADER)
    assert type(order[0]).__name__ == 'JEST', [type(a).__name__ for a in order]
    assert trainer.state.device_train_microbatch_size == 32
    assert trainer.state.train_dataloader.batch_size == 128  # super-batch = 32 / (1 - 0.75)


def test_compile_config_reaches_composer(tmp_path):
    # Composer compiles the model's forward (training and JEST's scoring both call it); 'eager' traces only.
    cfg = load_config('yamls/quickstart_reference.yaml', [f'save_folder={tmp_path}', 'max_duration=1ba',
                                                          'compile_config.backend=eager'])
    forward = build_trainer(cfg).state.model.forward
    assert getattr(forward, '_torchdynamo_orig_callable', None) is not None
    plain = build_trainer(load_config('yamls/quickstart_reference.yaml', [f'save_folder={tmp_path}'])).state.model
    assert getattr(plain.forward, '_torchdynamo_orig_callable', None) is None


def test_overrides_and_variables():
    cfg = load_config('yamls/quickstart.yaml', ['variables.filter_ratio=0.75', 'max_duration=7ba'])
    assert cfg.algorithms.jest.filter_ratio == 0.75 and cfg.max_duration == '7ba'


@pytest.mark.parametrize(
    'overrides, match',
    [
        (['modle.name=x'], "'modle'"),
        (['model.losss=sigmoid'], "'model.losss'"),
        (['train_loader.sorce=mds'], "'train_loader.sorce'"),
        (['train_loader.source=webdataset'],
         r"train_loader.source: unknown data source 'webdataset'; registered data sources: \['mds', 'shapes'\]"),
        (['global_train_batch_size=abc'], 'global_train_batch_size'),
        (['precision=bf16'], r"precision must be one of \['fp32', 'amp_fp16', 'amp_bf16', 'amp_fp8'\]"),
        (['max_duration=100steps'], "max_duration must be a Composer time string such as '100ba'"),
        (['eval_interval=often'], 'eval_interval must be a Composer time string'),
        (['parallelism_config.fdsp.x=1'], r"parallelism_config takes keys 'fsdp' and 'tp', got unknown \['fdsp'\]"),
        (['parallelism_config.fsdp.sharding_strateg=FULL_SHARD'],
         r"parallelism_config.fsdp has unknown keys \['sharding_strateg'\]; valid keys: .*'sharding_strategy'"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config('yamls/quickstart.yaml', overrides)


@pytest.mark.parametrize(
    'overrides, match',
    [
        (['algorithms.jest.filter_ratio=1.0'], r'algorithms.jest: filter_ratio must be a float in \[0, 1\)'),
        (['algorithms.jest.n_chunk=4'], r"algorithms.jest: unknown key\(s\) \['n_chunk'\]"),
        (['algorithms.jestt.filter_ratio=0.5'], "unknown algorithm 'jestt'; registered algorithms: .*'jest'"),
        (['callbacks.speed_monitr.window_size=1'], "unknown callback 'speed_monitr'"),
        (['optimizer.name=adamm'], "unknown optimizer 'adamm'"),
        (['variables.filter_ratio=0.7'], 'non-integer per-rank super-batch'),
        (['optimizer.betaz=[0.9,0.99]'],
         r"optimizer 'fused_decoupled_adamw': unknown key\(s\) \['betaz'\]; FusedDecoupledAdamW accepts \[.*'betas'"),
        (['scheduler.t_warmpu=10ba'], r"scheduler 'linear_decay_with_warmup': unknown key\(s\) \['t_warmpu'\]; "
                                      r"LinearWithWarmupScheduler accepts \['t_warmup'"),
    ],
)
def test_build_errors_name_the_field(overrides, match):
    cfg = load_config('yamls/quickstart.yaml', overrides)
    with pytest.raises(ValueError, match=match):
        dry_run(cfg)


def test_batch_sizes_per_rank():
    assert per_rank_batch_sizes(64, 0.5, 2) == (32, 64)
    assert per_rank_batch_sizes(64, 0.8, 2) == (32, 160)
    with pytest.raises(ValueError, match='divisible by the world size 4'):
        per_rank_batch_sizes(30, 0.5, 4)
    with pytest.raises(ValueError, match=r'filter_ratio=0.7 .* in \[6, 12, 18'):
        per_rank_batch_sizes(8, 0.7, 2)


def test_registry_has_jest_and_composer_algorithms():
    assert {'jest', 'gradient_clipping', 'ema', 'selective_backprop'} <= set(registry.names(registry.algorithms))
    assert {'speed_monitor', 'lr_monitor', 'selection_log'} <= set(registry.names(registry.callbacks))


def test_metrics_table_prints_integers_floats_and_nan():
    from composer_jest.run.train import MetricsSummary

    summary = MetricsSummary()
    summary.log_metrics({'metrics/eval/ZeroShotAccuracy': 0.25, 'jest/examples_seen': 640, 'jest/x': float('nan')})
    summary.log_metrics({'jest/examples_seen': 1280, 'loss/train/total': float('inf'), 'caption': 'not a number'})
    lines = dict(line.rsplit(None, 1) for line in summary.table().splitlines())
    assert lines == {'metrics/eval/ZeroShotAccuracy': '0.2500', 'jest/examples_seen': '1280',
                     'jest/x (mean)': 'nan', 'loss/train/total': 'inf'}


def test_loaders_normalize_with_the_model_preprocess_config():
    from composer_jest.run.builders import build_dataloader, build_model

    cfg = load_config('yamls/quickstart.yaml')
    model = build_model(cfg.model)
    model.towers.clip.visual.preprocess_cfg.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # SigLIP-style
    images = next(iter(build_dataloader(cfg.eval_loader, model, 64, train=False)))['image']
    # OpenAI's mean/std would map black to about -1.8; the model's own config maps [0, 1] to [-1, 1]
    assert images.min() >= -1.0 - 1e-5 and images.max() <= 1.0 + 1e-5
    assert images.min() < -0.5 and images.max() > 0.5


def test_a_run_is_reproducible_from_its_config(tmp_path):
    cfg = load_config('yamls/quickstart_reference.yaml', [f'save_folder={tmp_path}'])
    first, second = (build_trainer(cfg).state.model for _ in range(2))
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name  # same initial weights: the model is built after seeding
    other = build_trainer(load_config('yamls/quickstart_reference.yaml', [f'save_folder={tmp_path}', 'seed=18']))
    assert not torch.equal(next(first.parameters()), next(other.state.model.parameters()))


def test_components_from_other_packages_come_in_through_entry_points(monkeypatch):
    import importlib.metadata as md

    import catalogue

    # what `[project.entry-points.composer_jest_algorithms] smooth_labels = "..."` in another package gives
    ep = md.EntryPoint(name='smooth_labels', value='composer.algorithms.label_smoothing:LabelSmoothing',
                       group='composer_jest_algorithms')
    monkeypatch.setattr(catalogue, 'AVAILABLE_ENTRY_POINTS', md.EntryPoints([ep]))
    assert 'smooth_labels' in registry.names(registry.algorithms)
    built = dry_run(load_config('yamls/quickstart.yaml', ['algorithms.smooth_labels.smoothing=0.1']))['algorithms']
    assert [type(a).__name__ for a in built][0] == 'JEST'
    assert [a.smoothing for a in built if type(a).__name__ == 'LabelSmoothing'] == [0.1]


def test_a_data_source_registered_by_another_package_builds_from_yaml():
    """A yaml names data sources through the registry like algorithms: the loader gets N, never f."""
    calls = []

    def my_source(cfg, model, batch_size, train):
        calls.append((cfg.source, batch_size, train))
        return [{'image': torch.zeros(batch_size, 3, 32, 32), 'text': torch.zeros(batch_size, 16, dtype=torch.long)}]

    registry.data_sources.register('my_source', func=my_source)
    try:
        cfg = load_config('yamls/quickstart.yaml', ['train_loader.source=my_source', 'eval_loader=null',
                                                    'algorithms.jest.reference=cached', 'max_duration=1ba'])
        build_trainer(cfg)
    finally:
        catalogue._remove((*registry.data_sources.namespace, 'my_source'))
    assert calls == [('my_source', 128, True)]  # global_train_batch_size 32 at f = 0.75: a super-batch of 128


def test_dry_run_names_a_reference_that_does_not_exist_yet(tmp_path):
    missing = tmp_path / 'not-yet.pt'
    cfg = load_config('yamls/quickstart.yaml', [f'algorithms.jest.reference={missing}'])
    with pytest.warns(UserWarning, match=f"algorithms.jest.reference '{missing}' does not exist yet"):
        dry_run(cfg)
    with pytest.raises(ValueError, match='does not exist'):  # a real build refuses it
        build_trainer(cfg)
