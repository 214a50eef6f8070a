"""Shared fixtures: a tiny CLIP, shapes loaders, and a reference trained once per session on clean data."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Optional

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler

from composer_jest import CLIPModel
from composer_jest.data import shape_classnames, shapes_dataloader

# One torch thread per process (and per launched rank): on a 2-core machine with a busy neighbour, torch's
# default of one thread per core oversubscribes and multiplies the suite's time.
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)
warnings.filterwarnings('ignore', message='No pretrained weights loaded')
CLASS_TEMPLATES = ('a {name}', 'a picture of a {name}')


def make_model(loss: str = 'sigmoid', seed: int = 0, **kwargs) -> CLIPModel:
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
    return {k: float(v.compute()) for k, v in trainer.state.eval_metrics['eval'].items()}


def series(logger: InMemoryLogger, key: str) -> list[float]:
    return [float(v) for _, v in logger.data[key]]


@pytest.fixture(scope='session')
def tokenizer():
    return make_model().tokenizer


@pytest.fixture(scope='session')
def trained_reference(tmp_path_factory, tokenizer):
    """A jest-tiny reference trained on clean shapes (300 steps), and its Composer checkpoint path."""
    model = make_model(seed=0)
    folder = tmp_path_factory.mktemp('reference')
    trainer, _ = fit(model, shapes_dataloader(tokenizer, 300 * 64, 64, noise=0.0, seed=1), steps=300,
                     save_folder=str(folder), save_interval='300ba', save_filename='reference.pt')
    trainer.close()
    return model, folder / 'reference.pt'


def clean_fraction(batch_clean: torch.Tensor, indices: Optional[torch.Tensor] = None) -> float:
    values = batch_clean.float() if indices is None else batch_clean[indices].float()
    return float(values.mean())
