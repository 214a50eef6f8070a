"""A training set smaller than one (super-)batch is an error at start, not an endless run of empty epochs."""

from __future__ import annotations

import pytest
from model_helpers import fit, make_model
from torch.utils.data import DataLoader

from composer_jest import JEST
from composer_jest.data.demo.shapes import ShapesDataset
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config


def test_config_run_with_fewer_examples_than_one_batch_fails_at_build(tmp_path):
    cfg = load_config('yamls/quickstart_reference.yaml', [f'save_folder={tmp_path}', 'train_loader.num_samples=40'])
    match = (r'train_loader yields no batch: 40 examples per rank do not fill one batch of 64 .*'
             r'lower global_train_batch_size or algorithms.jest.filter_ratio')
    with pytest.raises(ValueError, match=match):
        build_trainer(cfg)


def test_jest_in_a_users_trainer_fails_at_fit_start_when_the_superbatch_never_fills():
    model = make_model()
    reference = make_model(seed=1)
    loader = DataLoader(ShapesDataset(30, tokenizer=model.tokenizer), batch_size=32, drop_last=True)  # N = 32 > 30
    jest = JEST(reference=reference.towers.clip, filter_ratio=0.5)
    with pytest.raises(ValueError, match='the train dataloader yields no batch: 30 examples per rank'):
        fit(model, loader, steps=2, algorithms=[jest], device_train_microbatch_size=16)
