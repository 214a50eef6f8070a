"""Helpers the model, algorithm and run tests share: a tiny CLIP, a short Composer fit, logged series.

Import by name (``tests/`` is on pytest's ``pythonpath``): ``from model_helpers import make_model, fit, series``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler

from composer_jest import CLIPModel
from composer_jest.data import shape_classnames

__all__ = ['CLASS_TEMPLATES', 'make_model', 'fit', 'eval_metrics', 'series', 'clean_fraction', 'captions']

CLASS_TEMPLATES = ('a {name}', 'a picture of a {name}')


def make_model(loss: str = 'sigmoid', seed: int = 0, **kwargs) -> CLIPModel:
    """The ``jest-tiny`` CLIP with the shapes class names (zero-shot metric), initialised from ``seed``."""
    torch.manual_seed(seed)  # test-only: the model init is the one global draw we make
    return CLIPModel('jest-tiny', loss=loss, classnames=shape_classnames(), class_templates=CLASS_TEMPLATES, **kwargs)


def fit(
    model: CLIPModel,
    train_loader,
    steps: int,
    algorithms: Sequence = (),
    eval_loader=None,
    lr: float = 1e-3,
    warmup: int = 50,
    seed: int = 0,
    **trainer_kwargs,
) -> tuple[Trainer, InMemoryLogger]:
    """Train ``model`` for ``steps`` batches (DecoupledAdamW, linear warm-up), logging to memory; returns the
    trainer (not closed) and the logger."""
    logger = InMemoryLogger()
    optimizer = DecoupledAdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    trainer = Trainer(
        model=model, train_dataloader=train_loader, eval_dataloader=eval_loader, max_duration=f'{steps}ba',
        optimizers=optimizer, schedulers=LinearWithWarmupScheduler(t_warmup=f'{warmup}ba', alpha_f=0.1),
        eval_interval=f'{steps}ba' if eval_loader is not None else 1, seed=seed, progress_bar=False,
        log_to_console=False, loggers=[logger], algorithms=list(algorithms), **trainer_kwargs,
    )
    trainer.fit()
    return trainer, logger


def eval_metrics(trainer: Trainer) -> dict[str, float]:
    """The computed ``eval`` metrics of ``trainer``."""
    return {k: float(v.compute()) for k, v in trainer.state.eval_metrics['eval'].items()}


def series(logger: InMemoryLogger, key: str) -> list[float]:
    """The values logged under ``key``, in step order."""
    return [float(v) for _, v in logger.data[key]]


def clean_fraction(batch_clean: torch.Tensor, indices: Optional[torch.Tensor] = None) -> float:
    """The mean of the ``clean`` flags (of the rows ``indices`` if given)."""
    values = batch_clean.float() if indices is None else batch_clean[indices].float()
    return float(values.mean())


def captions(n: int, context: int, vocab: int, seed: int, lengths=None) -> torch.Tensor:
    """Token ids with the EOT (the largest id) at position ``length - 1`` and zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(2, context + 1, (n,), generator=g).tolist()
    text = torch.zeros(n, context, dtype=torch.long)
    for i, length in enumerate(lengths):
        text[i, :length - 1] = torch.randint(1, vocab - 1, (length - 1,), generator=g)
        text[i, length - 1] = vocab - 1
    return text
