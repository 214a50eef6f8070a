"""Small builders: validated config -> the objects a Composer Trainer takes."""

from __future__ import annotations

from typing import Any, Optional

import torch
from composer import Trainer
from composer.core import Algorithm
from composer.utils import dist, reproducibility
from omegaconf import DictConfig, OmegaConf

from composer_jest import registry
from composer_jest.algorithm import JEST, jest_first
from composer_jest.checkpoint import check_resumable, load_checkpoint
from composer_jest.model import CLIPModel
from composer_jest.reference import load_weights

__all__ = [
    'dry_run',
    'build_model',
    'build_algorithms',
    'build_dataloader',
    'build_trainer',
    'per_rank_batch_sizes',
    'resolve_classnames',
]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) \
        else node


def resolve_classnames(spec: Any) -> Optional[list[str]]:
    """``shapes`` / ``fashion_mnist`` (built-in demo sets), an explicit list, or ``None``."""
    if spec is None:
        return None
    if spec == 'shapes':
        from composer_jest.data.demo.shapes import shape_classnames

        return shape_classnames()
    if spec == 'fashion_mnist':
        from composer_jest.data.demo import fashion_mnist

        return list(fashion_mnist.CLASSNAMES)
    if isinstance(spec, str):
        raise ValueError(f"model.classnames must be 'shapes', 'fashion_mnist', a list of names or null, got {spec!r}")
    return list(spec)


def build_model(cfg: DictConfig) -> CLIPModel:
    model = CLIPModel(
        _plain(cfg.name), loss=cfg.loss, classnames=resolve_classnames(_plain(cfg.classnames)),
        class_templates=list(cfg.class_templates), low_res_fraction=cfg.low_res_fraction,
        low_res_patch_size=cfg.low_res_patch_size,
    )
    if cfg.checkpoint:
        load_weights(model.towers.clip, cfg.checkpoint, _plain(cfg.name))  # a mismatch names the file and keys
    return model


def _build_named(registry_: Any, kind: str, section: dict, where: str) -> list:
    out = []
    for name, kwargs in (section or {}).items():
        kwargs = dict(kwargs or {})
        if not registry.has(registry_, name):
            raise ValueError(f'{where}: unknown {kind} {name!r}; registered {kind}s: {registry.names(registry_)}')
        factory = registry_.get(name)
        registry.check_kwargs(factory, kwargs, f'{where}.{name}')
        try:
            out.append(factory(**kwargs))
        except (ValueError, TypeError) as e:
            raise ValueError(f'{where}.{name}: {e}') from e
    return out


def build_algorithms(cfg: DictConfig) -> list[Algorithm]:
    """``algorithms:`` by registered name, JEST first."""
    section = _plain(cfg.algorithms) or {}
    reference = section.get('jest', {}).get('reference')
    if isinstance(reference, str) and reference != 'cached':  # the learner's architecture: checked at construction
        section = {**section, 'jest': {**section['jest'],
                                       'reference': {'model': _plain(cfg.model.name), 'checkpoint': reference}}}
    algorithms = _build_named(registry.algorithms, 'algorithm', section, 'algorithms')
    return sorted(algorithms, key=lambda a: not isinstance(a, JEST))


def _filter_ratio(algorithms: list[Algorithm]) -> float:
    return next((a.filter_ratio for a in algorithms if isinstance(a, JEST)), 0.0)


def per_rank_batch_sizes(global_batch_size: int, filter_ratio: float, world_size: int) -> tuple[int, int]:
    """``(b, N)``: the per-rank trained batch and the per-rank super-batch ``N = b / (1 - f)``."""
    if global_batch_size % world_size:
        raise ValueError(
            f'global_train_batch_size={global_batch_size} must be divisible by the world size {world_size}',
        )
    b = global_batch_size // world_size
    n = b / (1.0 - filter_ratio)
    if abs(n - round(n)) > 1e-6:
        valid = [k for k in range(world_size, 4 * global_batch_size + 1, world_size)
                 if abs(k // world_size / (1 - filter_ratio) - round(k // world_size / (1 - filter_ratio))) < 1e-6][:6]
        raise ValueError(
            f'global_train_batch_size={global_batch_size} with algorithms.jest.filter_ratio={filter_ratio} gives a '
            f'non-integer per-rank super-batch {n:.3f}; e.g. global_train_batch_size in {valid}',
        )
    return b, int(round(n))


def build_dataloader(cfg: DictConfig, model: CLIPModel, batch_size: int, train: bool, filter_ratio: float = 0.0,
                     seed: int = 0):
    """A per-rank dataloader. For training, ``batch_size`` is the per-rank *trained* batch ``b``."""
    if cfg.source == 'shapes':
        return _shapes_loader(cfg, model, batch_size, train, filter_ratio)
    from composer_jest.data.streaming import build_streaming_dataloader

    kwargs = dict(_plain(cfg.extra) or {})
    if cfg.prefetch_factor is not None:
        kwargs['prefetch_factor'] = cfg.prefetch_factor
    return build_streaming_dataloader(
        cfg.remote, cfg.local, model.tokenizer, batch_size=batch_size, filter_ratio=filter_ratio if train else 0.0,
        transform=model.image_transform(), shuffle=cfg.shuffle and train, shuffle_seed=cfg.shuffle_seed,
        drop_last=train, num_workers=cfg.num_workers, cache_limit=cfg.cache_limit, predownload=cfg.predownload,
        **kwargs,
    )


def _shapes_loader(cfg, model, batch_size, train, filter_ratio):
    from composer_jest.data.demo.shapes import ShapesDataset

    image_size = model.towers.clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    dataset = ShapesDataset(cfg.num_samples, noise=cfg.noise, seed=cfg.seed, image_size=image_size,
                            transform=model.image_transform(),
                            tokenizer=model.tokenizer, **(_plain(cfg.extra) or {}))
    loader_batch = per_rank_batch_sizes(batch_size, filter_ratio, 1)[1] if train else batch_size
    sampler = dist.get_sampler(dataset, drop_last=train, shuffle=train and cfg.shuffle, seed=cfg.shuffle_seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=loader_batch, sampler=sampler, drop_last=train, num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None, persistent_workers=cfg.num_workers > 0,
    )


def dry_run(cfg: DictConfig, world_size: Optional[int] = None) -> dict[str, Any]:
    """Build everything but the data loaders and the Trainer: catches config errors without data access.

    A JEST reference checkpoint that does not exist yet (made by an earlier run of a recipe) is allowed.
    """
    model = build_model(cfg.model)
    section = _plain(cfg.algorithms) or {}
    if isinstance(section.get('jest', {}).get('reference'), str):
        import os

        if not os.path.exists(section['jest']['reference']):
            section = {**section, 'jest': {**section['jest'], 'reference': 'cached'}}
    algorithms = sorted(_build_named(registry.algorithms, 'algorithm', section, 'algorithms'),
                        key=lambda a: not isinstance(a, JEST))
    per_rank_batch_sizes(cfg.global_train_batch_size, _filter_ratio(algorithms), world_size or dist.get_world_size())
    optimizer_cfg = dict(_plain(cfg.optimizer))
    optimizer = registry.build(registry.optimizers, optimizer_cfg.pop('name'), 'optimizer', model.parameters(),
                               **optimizer_cfg)
    built = {'model': model, 'algorithms': algorithms, 'optimizer': optimizer}
    if cfg.scheduler is not None:
        scheduler_cfg = dict(_plain(cfg.scheduler))
        built['scheduler'] = registry.build(registry.schedulers, scheduler_cfg.pop('name'), 'scheduler',
                                            **scheduler_cfg)
    built['callbacks'] = _build_named(registry.callbacks, 'callback', _plain(cfg.callbacks), 'callbacks')
    built['loggers'] = _build_named(registry.loggers, 'logger', _plain(cfg.loggers), 'loggers')
    return built


def build_trainer(cfg: DictConfig, extra_loggers: Optional[list] = None) -> Trainer:
    """Everything in the config, built and handed to a Composer Trainer (nothing is trained yet)."""
    # The Trainer seeds only when it is constructed: seed before the model's initialisation too, the same
    # on every rank (identical initial weights), so that a run is reproducible from its config.
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg.model)
    algorithms = build_algorithms(cfg)
    f = _filter_ratio(algorithms)
    b, _ = per_rank_batch_sizes(cfg.global_train_batch_size, f, dist.get_world_size())
    train_loader = build_dataloader(cfg.train_loader, model, b, train=True, filter_ratio=f)
    eval_loader = None
    if cfg.eval_loader is not None:
        eval_loader = build_dataloader(cfg.eval_loader, model, cfg.device_eval_batch_size, train=False)
    optimizer_cfg = dict(_plain(cfg.optimizer))
    optimizer = registry.build(registry.optimizers, optimizer_cfg.pop('name'), 'optimizer', model.parameters(),
                               **optimizer_cfg)
    schedulers = []
    if cfg.scheduler is not None:
        scheduler_cfg = dict(_plain(cfg.scheduler))
        schedulers = [registry.build(registry.schedulers, scheduler_cfg.pop('name'), 'scheduler', **scheduler_cfg)]
    callbacks = _build_named(registry.callbacks, 'callback', _plain(cfg.callbacks), 'callbacks')
    loggers = _build_named(registry.loggers, 'logger', _plain(cfg.loggers), 'loggers') + list(extra_loggers or [])
    microbatch = cfg.device_train_microbatch_size if cfg.device_train_microbatch_size is not None else b
    _check_checkpoints(cfg)
    return Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=train_loader, eval_dataloader=eval_loader,
        max_duration=cfg.max_duration, eval_interval=cfg.eval_interval, optimizers=optimizer, schedulers=schedulers,
        algorithms=algorithms, algorithm_passes=[jest_first], callbacks=callbacks, loggers=loggers,
        precision=cfg.precision, device_train_microbatch_size=microbatch, seed=cfg.seed,
        parallelism_config=_plain(cfg.parallelism_config), save_folder=cfg.save_folder,
        save_interval=cfg.save_interval, save_filename=cfg.save_filename,
        save_latest_filename=cfg.save_latest_filename, save_overwrite=cfg.save_overwrite,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, load_path=cfg.load_path,
        autoresume=cfg.autoresume, dist_timeout=cfg.dist_timeout, progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console, console_log_interval=cfg.console_log_interval,
    )


def _check_checkpoints(cfg: DictConfig) -> None:
    """Before Composer unpickles them (``weights_only=False``): a local ``load_path`` must load safely, and
    ``autoresume`` must find a readable latest checkpoint (else it falls back to the previous valid one)."""
    import os

    resumes = cfg.autoresume and check_resumable(cfg.save_folder, cfg.save_latest_filename or 'latest-rank{rank}.pt',
                                                 dist.get_global_rank()) is not None
    if cfg.load_path and not resumes and os.path.isfile(cfg.load_path):
        load_checkpoint(cfg.load_path)  # refuses a file holding arbitrary Python objects, naming it
