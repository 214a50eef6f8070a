"""Shared fixtures: the tokenizer and a reference trained once per session on clean data; one torch thread.

Plain helpers (``make_model``, ``fit``, ``series``, ``eval_metrics``) live in ``tests/model_helpers.py``: import
them by name (``from model_helpers import make_model``), never from this file.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from model_helpers import fit, make_model

from composer_jest.data import shapes_dataloader

# One torch thread per process (and per launched rank): on a 2-core machine with a busy neighbour, torch's
# default of one thread per core oversubscribes and multiplies the suite's time.
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)
warnings.filterwarnings('ignore', message='No pretrained weights loaded')


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
