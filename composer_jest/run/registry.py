"""Registries of buildable components by name (yaml ``algorithms:``, ``callbacks:``, ``loggers:``, …).

Each registry is a ``catalogue`` registry with entry points, so other packages can add components
without touching this one, e.g. in their ``pyproject.toml``::

    [project.entry-points.composer_jest_algorithms]
    my_algo = "my_pkg.algos:MyAlgorithm"

Composer's own algorithms, callbacks and loggers are registered by their module names
(``gradient_clipping``, ``speed_monitor``, ``progress_bar`` …).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import catalogue
import torch
from composer import algorithms as composer_algorithms
from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer import optim as composer_optim
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination

__all__ = ['algorithms', 'callbacks', 'loggers', 'optimizers', 'schedulers', 'data_sources', 'losses', 'build',
           'build_section', 'check_kwargs', 'has', 'names']

algorithms = catalogue.create('composer_jest', 'algorithms', entry_points=True)
callbacks = catalogue.create('composer_jest', 'callbacks', entry_points=True)
loggers = catalogue.create('composer_jest', 'loggers', entry_points=True)
optimizers = catalogue.create('composer_jest', 'optimizers', entry_points=True)
schedulers = catalogue.create('composer_jest', 'schedulers', entry_points=True)
# `train_loader.source` / `eval_loader.source`: (cfg, model, batch_size, train) -> DataLoader
data_sources = catalogue.create('composer_jest', 'data_sources', entry_points=True)
# `model.loss` / `JEST(loss=...)`: contrastive objectives (composer_jest.core.objectives.build_objective builds them)
from composer_jest.core.objectives import LOSS_REGISTRY as losses  # noqa: E402


def _module_name(cls: type, strip: str = '') -> str:
    name = cls.__module__.rsplit('.', 1)[-1]
    return re.sub(f'{strip}$', '', name) if strip else name


def _register_composer(registry: catalogue.Registry, module: Any, base: type, strip: str = '') -> None:
    for attr in module.__all__:
        cls = getattr(module, attr)
        if inspect.isclass(cls) and issubclass(cls, base) and cls is not base:
            name = _module_name(cls, strip)
            if name not in registry.get_all():
                registry.register(name, func=cls)


def _register_builtins() -> None:
    from composer_jest.data.sources import mds_source, shapes_source
    from composer_jest.jest.algorithm import JEST
    from composer_jest.jest.callbacks import SelectionLog
    from composer_jest.jest.reference_features import ReferenceFeatures
    from composer_jest.run.optim import FusedDecoupledAdamW

    algorithms.register('jest', func=JEST)
    algorithms.register('reference_features', func=ReferenceFeatures)
    callbacks.register('selection_log', func=SelectionLog)
    data_sources.register('shapes', func=shapes_source)
    data_sources.register('mds', func=mds_source)
    _register_composer(algorithms, composer_algorithms, Algorithm)
    _register_composer(callbacks, composer_callbacks, Callback)
    _register_composer(loggers, composer_loggers, LoggerDestination, strip='_logger')
    optimizers.register('decoupled_adamw', func=composer_optim.DecoupledAdamW)
    optimizers.register('decoupled_sgdw', func=composer_optim.DecoupledSGDW)
    optimizers.register('fused_decoupled_adamw', func=FusedDecoupledAdamW)
    optimizers.register('adamw', func=torch.optim.AdamW)
    optimizers.register('sgd', func=torch.optim.SGD)
    for name, cls in (
        ('constant_with_warmup', composer_optim.ConstantWithWarmupScheduler),
        ('linear_decay_with_warmup', composer_optim.LinearWithWarmupScheduler),
        ('cosine_with_warmup', composer_optim.CosineAnnealingWithWarmupScheduler),
        ('constant', composer_optim.ConstantScheduler),
        ('cosine', composer_optim.CosineAnnealingScheduler),
    ):
        schedulers.register(name, func=cls)


_register_builtins()


def names(registry: catalogue.Registry) -> list[str]:
    """Registered names, entry points included."""
    return sorted(registry.get_all())


def has(registry: catalogue.Registry, name: str) -> bool:
    return name in registry.get_all()


def get(registry: catalogue.Registry, name: str, kind: str, where: str = '') -> Any:
    """The factory registered as ``name``; an unknown name fails with the list of valid ones."""
    if not has(registry, name):
        prefix = f'{where}: ' if where else ''
        raise ValueError(f'{prefix}unknown {kind} {name!r}; registered {kind}s: {names(registry)}')
    return registry.get(name)


def build(registry: catalogue.Registry, name: str, kind: str, *args, **kwargs) -> Any:
    """Build ``name`` from ``registry`` (e.g. a yaml ``optimizer: {name: ..., **kwargs}``).

    Unknown names and unknown keyword arguments fail before anything is built, naming the valid ones.
    """
    factory = get(registry, name, kind)
    check_kwargs(factory, kwargs, f'{kind} {name!r}')
    return factory(*args, **kwargs)


def build_section(registry: catalogue.Registry, kind: str, section: dict | None, where: str) -> list:
    """Build every entry of a yaml section ``{name: kwargs, ...}`` (``algorithms:``, ``callbacks:``...).

    Errors name the entry: ``where.name``.
    """
    out = []
    for name, kwargs in (section or {}).items():
        kwargs = dict(kwargs or {})
        factory = get(registry, name, kind, where)
        check_kwargs(factory, kwargs, f'{where}.{name}')
        try:
            out.append(factory(**kwargs))
        except (ValueError, TypeError) as e:
            raise ValueError(f'{where}.{name}: {e}') from e
    return out


def check_kwargs(factory: Any, kwargs: dict, where: str) -> None:
    """Reject keys ``factory`` does not take, naming ``where`` and the accepted keys."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature (some builtins): the call reports
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind != p.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        name = getattr(factory, '__name__', type(factory).__name__)
        raise ValueError(f'{where}: unknown key(s) {unknown}; {name} accepts {accepted}')
