"""Data sources a yaml names (``train_loader.source``), registered in :data:`composer_jest.run.registry.data_sources`.

A source turns a loader config (:class:`~composer_jest.run.config.DataConfig`) into a per-rank ``DataLoader``:
``source(cfg, model, batch_size, train)``, where ``batch_size`` is what the loader yields per step (the
super-batch ``N`` of a JEST training loader; sources never see the filter ratio). Other packages add sources
through the ``composer_jest_data_sources`` entry-point group, like algorithms.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.utils import dist
from omegaconf import DictConfig, OmegaConf

__all__ = ['shapes_source', 'mds_source']


def _extra(cfg: DictConfig) -> dict[str, Any]:
    return dict(OmegaConf.to_container(cfg.extra, resolve=True) if isinstance(cfg.extra, DictConfig)
                else cfg.extra or {})


def shapes_source(cfg: DictConfig, model, batch_size: int, train: bool) -> torch.utils.data.DataLoader:
    """The procedural shapes demo set (``num_samples``, ``noise``, ``seed``, ``label``), at the model's image size."""
    from composer_jest.data.demo.shapes import ShapesDataset  # noqa: PLC0415

    if cfg.get('two_stage') is not None:
        raise ValueError('two_stage: two-stage decoding needs source: mds (JPEG files in MDS shards)')
    image_size = model.towers.clip.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    dataset = ShapesDataset(cfg.num_samples, noise=cfg.noise, seed=cfg.seed, image_size=image_size, label=cfg.label,
                            transform=model.image_transform(), tokenizer=model.tokenizer, **_extra(cfg))
    sampler = dist.get_sampler(dataset, drop_last=train, shuffle=train and cfg.shuffle, seed=cfg.shuffle_seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train, num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None, persistent_workers=cfg.num_workers > 0,
    )


def mds_source(cfg: DictConfig, model, batch_size: int, train: bool):
    """MDS shards streamed from ``remote`` (``s3://``) into ``local``, or read from ``local`` alone."""
    from composer_jest.data.streaming import build_streaming_dataloader  # noqa: PLC0415

    kwargs = _extra(cfg)
    if cfg.prefetch_factor is not None:
        kwargs['prefetch_factor'] = cfg.prefetch_factor
    transform = model.image_transform()
    if cfg.get('two_stage') is not None:  # stage 1: draft-mode decode at the scoring resolution, plus the bytes
        from composer_jest.data.two_stage import ScoringTransform  # noqa: PLC0415

        size = cfg.two_stage.scoring_image_size
        if size is None:
            raise ValueError('two_stage.scoring_image_size is not set (builders.build_trainer derives it from '
                             'algorithms.jest.learner_patch_size)')
        transform, kwargs['two_stage_size'] = ScoringTransform(model.preprocess_cfg(), size), size
    return build_streaming_dataloader(
        cfg.remote, cfg.local, model.tokenizer, batch_size=batch_size, transform=transform,
        shuffle=cfg.shuffle and train, shuffle_seed=cfg.shuffle_seed, drop_last=train, num_workers=cfg.num_workers,
        cache_limit=cfg.cache_limit, predownload=cfg.predownload, **kwargs,
    )
