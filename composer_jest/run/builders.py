"""Small builders: validated config -> the objects a Composer Trainer takes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from composer import Trainer
from composer.core import Algorithm, DataSpec
from composer.utils import dist, reproducibility
from omegaconf import DictConfig, OmegaConf

from composer_jest.core.batch import (
    CACHED_REFERENCE_KEYS,
    LABEL_KEY,
    check_train_batches,
    loader_batch_keys,
    superbatch_size,
)
from composer_jest.core.step import SelectionSettings
from composer_jest.data.two_stage import FullResDecoder, RandomResizedCropFlip
from composer_jest.jest.algorithm import JEST, jest_first
from composer_jest.jest.reference import load_weights
from composer_jest.jest.reference_features import ReferenceFeatures
from composer_jest.models.checkpoint import check_resumable, load_checkpoint
from composer_jest.models.clip import CLIPModel
from composer_jest.run import registry
from composer_jest.run.console import EvalSummary, metrics_file_logger, show_progress, split_eval_batch

__all__ = [
    'dry_run',
    'build_model',
    'build_algorithms',
    'build_dataloader',
    'build_trainer',
    'build_components',
    'per_rank_batch_sizes',
    'resolve_classnames',
    'check_batch_keys',
    'full_res_decoder',
    'with_scoring_image_size',
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
    if cfg.checkpoint and cfg.pretrained:
        raise ValueError('model: give checkpoint (a checkpoint of this package or a state_dict) or pretrained (an '
                         f'open_clip tag or weights file), not both; got {cfg.checkpoint!r} and {cfg.pretrained!r}')
    model = CLIPModel(
        _plain(cfg.name), loss=_plain(cfg.loss), classnames=resolve_classnames(_plain(cfg.classnames)),
        class_templates=list(cfg.class_templates), low_res_fraction=cfg.low_res_fraction,
        low_res_patch_size=cfg.low_res_patch_size, pretrained=cfg.pretrained,
    )
    if cfg.checkpoint:
        load_weights(model.towers.clip, cfg.checkpoint, _plain(cfg.name))  # a mismatch names the file and keys
    return model


def build_algorithms(cfg: DictConfig, missing_reference_ok: bool = False, full_res: Any = None) -> list[Algorithm]:
    """``algorithms:`` by registered name, JEST first.

    A bare reference path takes the learner's architecture (checked at construction). With
    ``missing_reference_ok`` a reference checkpoint that does not exist yet (an earlier stage of a recipe makes
    it) is reported by a warning and JEST is checked as if its reference were ``cached``.
    """
    section = _plain(cfg.algorithms) or {}
    reference = section.get('jest', {}).get('reference')
    if isinstance(reference, str) and reference != 'cached':
        if missing_reference_ok and not os.path.exists(reference):
            warnings.warn(f'algorithms.jest.reference {reference!r} does not exist yet: the rest of the config was '
                          'checked; the run needs it', UserWarning, stacklevel=2)
            reference = 'cached'
        else:
            reference = {'model': _plain(cfg.model.name), 'checkpoint': reference}
        section = {**section, 'jest': {**section['jest'], 'reference': reference}}
    if full_res is not None:  # two-stage decoding: JEST decodes the selected examples
        if 'jest' not in section:
            raise ValueError('train_loader.two_stage needs algorithms.jest (JEST selects between the two stages)')
        section = {**section, 'jest': {**section['jest'], 'full_res': full_res}}
    algorithms = registry.build_section(registry.algorithms, 'algorithm', section, 'algorithms')
    return sorted(algorithms, key=lambda a: not isinstance(a, JEST))


def _jest_section(cfg: DictConfig) -> Optional[dict]:
    """``algorithms.jest`` as a plain dict (``{}`` when it has no keys), or ``None`` for a run without JEST."""
    section = _plain(cfg.algorithms) or {}
    return dict(section['jest'] or {}) if 'jest' in section else None


def config_filter_ratio(cfg: DictConfig) -> float:
    """``f`` as the config says: ``algorithms.jest.filter_ratio`` (JEST's default if omitted), 0 without JEST.

    Read from the config, never off a built :class:`JEST`: the loader is sized from it (``N = b / (1 - f)``, see
    :func:`per_rank_batch_sizes`) and JEST is built with it, each from this one value.
    """
    section = _jest_section(cfg)
    return 0.0 if section is None else section.get('filter_ratio', SelectionSettings.filter_ratio)


def per_rank_batch_sizes(global_batch_size: int, filter_ratio: float, world_size: int) -> tuple[int, int]:
    """``(b, N)``: the per-rank trained batch and the per-rank super-batch ``N = b / (1 - f)``."""
    if global_batch_size % world_size:
        raise ValueError(
            f'global_train_batch_size={global_batch_size} must be divisible by the world size {world_size}',
        )
    b = global_batch_size // world_size
    try:
        return b, superbatch_size(b, filter_ratio)
    except ValueError:
        valid = [k for k in range(world_size, 4 * global_batch_size + 1, world_size)
                 if abs(k // world_size / (1 - filter_ratio) - round(k // world_size / (1 - filter_ratio))) < 1e-6][:6]
        raise ValueError(
            f'global_train_batch_size={global_batch_size} with algorithms.jest.filter_ratio={filter_ratio} gives a '
            f'non-integer per-rank super-batch {b / (1 - filter_ratio):.3f}; e.g. global_train_batch_size in {valid}',
        ) from None


def build_dataloader(cfg: DictConfig, model: CLIPModel, batch_size: int, train: bool):
    """A per-rank dataloader from the registered data source ``cfg.source``.

    ``batch_size`` is what it yields per step: for JEST training, the super-batch ``N``.
    """
    source = registry.get(registry.data_sources, cfg.source, 'data source', 'source')
    return source(cfg, model, batch_size, train)


def build_components(cfg: DictConfig, world_size: Optional[int] = None,
                     missing_reference_ok: bool = False) -> dict[str, Any]:
    """Everything but the data loaders and the Trainer, built from the config.

    Returns ``model``, ``algorithms`` (JEST first), ``optimizer``, ``schedulers``, ``callbacks``, ``loggers``,
    the per-rank trained batch ``b`` and super-batch ``N`` (both from the config's ``filter_ratio``), and
    ``train_loader``: the train loader's config, with two-stage decoding's scoring image size resolved.
    """
    model = build_model(cfg.model)
    train_loader = with_scoring_image_size(cfg.train_loader, model, _jest_section(cfg))
    algorithms = build_algorithms(cfg, missing_reference_ok, full_res=full_res_decoder(train_loader, model))
    b, n = per_rank_batch_sizes(cfg.global_train_batch_size, config_filter_ratio(cfg),
                                world_size or dist.get_world_size())
    optimizer_cfg = dict(_plain(cfg.optimizer))
    optimizer = registry.build(registry.optimizers, optimizer_cfg.pop('name'), 'optimizer', model.parameters(),
                               **optimizer_cfg)
    schedulers = []
    if cfg.scheduler is not None:
        scheduler_cfg = dict(_plain(cfg.scheduler))
        schedulers = [registry.build(registry.schedulers, scheduler_cfg.pop('name'), 'scheduler', **scheduler_cfg)]
    return {
        'model': model, 'algorithms': algorithms, 'optimizer': optimizer, 'schedulers': schedulers,
        'callbacks': registry.build_section(registry.callbacks, 'callback', _plain(cfg.callbacks), 'callbacks'),
        'loggers': registry.build_section(registry.loggers, 'logger', _plain(cfg.loggers), 'loggers'),
        'b': b, 'N': n, 'train_loader': train_loader,
    }


def full_res_decoder(cfg: DictConfig, model: CLIPModel) -> Optional[FullResDecoder]:
    """The stage-2 decoder of a loader config's ``two_stage`` section (``None`` without one)."""
    two = cfg.get('two_stage')
    if two is None:
        return None
    augment = None
    if two.augment:
        augment = RandomResizedCropFlip(scale=tuple(two.augment_scale), ratio=tuple(two.augment_ratio),
                                        flip=two.augment_flip)
    return FullResDecoder(model.preprocess_cfg(), threads=two.decode_threads, device=two.decode_device,
                          augment=augment, seed=two.augment_seed, rank=dist.get_global_rank())


def with_scoring_image_size(cfg: DictConfig, model: CLIPModel, jest: Optional[dict]) -> DictConfig:
    """A train loader config whose ``two_stage.scoring_image_size`` is set: the side at which the learner's native
    patch gives ``learner_patch_size``'s token grid (``jest``: the ``algorithms.jest`` section), unless given.

    Two-stage decoding is resolved once, from the config, before anything is built: this size goes to the loader
    and the decoder (:func:`full_res_decoder`) to JEST; nothing is read back from either.
    """
    if cfg.get('two_stage') is None or cfg.two_stage.scoring_image_size is not None:
        return cfg
    if jest is None:
        raise ValueError('train_loader.two_stage needs algorithms.jest (JEST selects between the two stages)')
    size = model.scoring_image_size(jest.get('learner_patch_size'))
    return OmegaConf.merge(cfg, {'two_stage': {'scoring_image_size': size}})


def dry_run(cfg: DictConfig, world_size: Optional[int] = None) -> dict[str, Any]:
    """:func:`build_components` without data access: catches config errors before a run.

    A JEST reference checkpoint that does not exist yet (made by an earlier run of a recipe) is named in a warning.
    """
    return build_components(cfg, world_size, missing_reference_ok=True)


def build_trainer(cfg: DictConfig, extra_loggers: Optional[list] = None) -> Trainer:
    """Everything in the config, built and handed to a Composer Trainer (nothing is trained yet)."""
    # The Trainer seeds only when it is constructed: seed before the model's initialisation too, the same
    # on every rank (identical initial weights), so that a run is reproducible from its config.
    reproducibility.seed_all(cfg.seed)
    built = build_components(cfg)
    model, b = built['model'], built['b']
    train_loader = build_dataloader(built['train_loader'], model, built['N'], train=True)
    eval_loader = None
    if cfg.eval_loader is not None:
        eval_loader = build_dataloader(cfg.eval_loader, model, cfg.device_eval_batch_size, train=False)
    microbatch = cfg.device_train_microbatch_size if cfg.device_train_microbatch_size is not None else b
    check_batch_keys(built['model'], built['algorithms'], train_loader, eval_loader)
    check_train_batches(train_loader)
    if eval_loader is not None:
        eval_loader = DataSpec(eval_loader, split_batch=split_eval_batch)  # no warning on a short last batch
    console = [EvalSummary()] if cfg.eval_summary else []
    if cfg.metrics_file:
        console.append(metrics_file_logger(cfg.metrics_file))
    _check_checkpoints(cfg)
    return Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=train_loader, eval_dataloader=eval_loader,
        max_duration=cfg.max_duration, eval_interval=cfg.eval_interval, optimizers=built['optimizer'],
        schedulers=built['schedulers'], algorithms=built['algorithms'], algorithm_passes=[jest_first],
        callbacks=built['callbacks'], loggers=built['loggers'] + console + list(extra_loggers or []),
        precision=cfg.precision, device_train_microbatch_size=microbatch, seed=cfg.seed,
        parallelism_config=_plain(cfg.parallelism_config), compile_config=_plain(cfg.compile_config),
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval, save_filename=cfg.save_filename,
        save_latest_filename=cfg.save_latest_filename, save_overwrite=cfg.save_overwrite,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, load_path=cfg.load_path,
        autoresume=cfg.autoresume, dist_timeout=cfg.dist_timeout, progress_bar=show_progress(cfg.progress_bar),
        log_to_console=cfg.log_to_console, console_log_interval=cfg.console_log_interval,
    )


_KEEP_HINT = ('numeric CSV/JSONL columns reach the batch when converted with `composer-jest convert folder|webdataset '
              '--keep-columns NAME` (without it they land in the json `meta` column, which never reaches the batch)')
_LABEL_HINT = ('write it with `composer-jest convert folder --captions ... --label-column NAME` (an integer class '
               'column), or set model.classnames: null to evaluate retrieval only')
_CACHED_HINT = 'write them with `composer-jest embed-reference`, or give algorithms.jest.reference a checkpoint'


def check_batch_keys(model: CLIPModel, algorithms: list[Algorithm], train_loader: Any, eval_loader: Any) -> None:
    """Before training: the batch keys the run reads are among those the loaders declare.

    JEST's ``track_keys`` (and the cached reference columns for ``reference: cached`` or a steered ``model.loss``)
    must be train batch keys;
    zero-shot evaluation (``model.classnames``) needs ``label`` in the eval batches. Loaders whose dataset does
    not declare its keys (:func:`composer_jest.core.batch.loader_batch_keys`) are checked when the batch arrives.
    Raises a ValueError listing the available keys and the option that writes the missing column.
    """
    live = any(isinstance(a, ReferenceFeatures) for a in algorithms)  # writes the columns into every batch
    if model.objective.reference_keys and not live:  # a steered loss (drrho, distill) trains on them
        _require_keys(train_loader, model.objective.reference_keys, f'model.loss {model.objective.spec()!r}',
                      'train_loader', 'write them with `composer-jest embed-reference`, or add '
                      '`algorithms: reference_features: {reference: <checkpoint>}` to run the reference live')
    jest = next((a for a in algorithms if isinstance(a, JEST)), None)
    if jest is not None:
        _require_keys(train_loader, jest.track_keys, 'algorithms.jest.track_keys', 'train_loader', _KEEP_HINT)
        if jest.reference_spec == 'cached':
            _require_keys(train_loader, CACHED_REFERENCE_KEYS, "algorithms.jest.reference: cached", 'train_loader',
                          _CACHED_HINT)
    if eval_loader is not None and model.classnames is not None:
        _require_keys(eval_loader, (LABEL_KEY,), 'model.classnames (zero-shot accuracy)', 'eval_loader', _LABEL_HINT)


def _require_keys(loader: Any, needed: Sequence[str], what: str, where: str, hint: str) -> None:
    keys = loader_batch_keys(loader)
    missing = [k for k in needed if keys is not None and k not in keys]
    if missing:
        raise ValueError(f'{what} needs batch key(s) {missing}, but the {where} batches carry only {sorted(keys)}: '
                         f'{hint}')


def _check_checkpoints(cfg: DictConfig) -> None:
    """Before Composer unpickles them (``weights_only=False``): a local ``load_path`` must load safely, and
    ``autoresume`` must find a readable latest checkpoint (else it falls back to the previous valid one)."""
    resumes = cfg.autoresume and check_resumable(cfg.save_folder, cfg.save_latest_filename or 'latest-rank{rank}.pt',
                                                 dist.get_global_rank()) is not None
    if cfg.load_path and not resumes and os.path.isfile(cfg.load_path):
        load_checkpoint(cfg.load_path)  # refuses a file holding arbitrary Python objects, naming it
