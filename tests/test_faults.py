"""Faults and bad files, as an operator meets them: each test breaks one thing and checks the error or recovery.

Checkpoints (unsafe pickles, non-checkpoints, other architectures, a truncated latest checkpoint), conversion
(a failed ``--overwrite`` keeps the old dataset, locally and on S3; encodings; caption counts), shards (corrupted
or truncated in a local dir or the cache; a corrupt cached index), a flaky or frozen S3 endpoint, and
non-finite scores named by their source. Everything runs on local files or the moto endpoint, bounded in time.
"""

from __future__ import annotations

import fractions
import os
import warnings

import pytest
import torch
from composer import Trainer
from conftest import fit, make_model

from composer_jest import JEST
from composer_jest.checkpoint import CheckpointError, check_resumable
from composer_jest.data import shapes_dataloader
from composer_jest.model import checkpoint_state_dict

OTHER_ARCH = {  # jest-tiny with a wider text tower: same keys, other shapes
    'embed_dim': 64, 'init_logit_bias': -10.0,
    'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 128, 'layers': 2, 'head_width': 32},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 4, 'layers': 2},
}


@pytest.fixture(scope='module')
def composer_checkpoint(tmp_path_factory):
    """A real Composer checkpoint of a jest-tiny CLIPModel (model, optimizer, RNG states, timestamp)."""
    folder = tmp_path_factory.mktemp('ckpt')
    trainer = Trainer(model=make_model(seed=3), max_duration='1ba', progress_bar=False)
    trainer.save_checkpoint(str(folder / 'learner.pt'))
    trainer.close()
    return folder / 'learner.pt'


# -- 1. checkpoints are loaded safely ------------------------------------------------------------------------
def test_composer_checkpoint_loads_with_weights_only(composer_checkpoint):
    weights = checkpoint_state_dict(composer_checkpoint)
    assert weights['logit_scale'].shape == (1,) and 'visual.conv1.weight' in weights


def test_checkpoint_holding_a_python_object_is_refused(composer_checkpoint, tmp_path):
    obj = torch.load(composer_checkpoint, weights_only=False)  # the test's own file: trusted
    obj['state']['extra'] = fractions.Fraction(1, 3)  # any class: unpickling it may run its code
    evil = tmp_path / 'downloaded.pt'
    torch.save(obj, evil)
    with pytest.raises(CheckpointError, match=r'downloaded\.pt: refused to load.*fractions\.Fraction'):
        JEST(reference=str(evil), filter_ratio=0.5)
    with pytest.raises(CheckpointError, match='refused'):
        checkpoint_state_dict(evil)  # model.checkpoint and embed-reference --checkpoint load through this


def test_non_checkpoint_file_is_named_at_construction(tmp_path):
    text = tmp_path / 'reference.pt'
    text.write_text('<html>403 Forbidden</html>')
    with pytest.raises(CheckpointError, match=r'reference\.pt: not a PyTorch checkpoint'):
        JEST(reference=str(text), filter_ratio=0.5)


def test_reference_of_another_architecture_fails_at_construction(composer_checkpoint):
    with pytest.raises(ValueError, match=r"learner\.pt' does not fit.*shape mismatches.*text_projection") as info:
        JEST(reference={'model': OTHER_ARCH, 'checkpoint': str(composer_checkpoint)}, filter_ratio=0.5)
    assert str(composer_checkpoint) in str(info.value)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model = make_model(seed=0)
    loader = lambda: shapes_dataloader(model.tokenizer, 3 * 8, 8, seed=1)  # noqa: E731
    kwargs = dict(save_folder=str(tmp_path), save_interval='1ba', save_filename='ba{batch}.pt', run_name='r')
    fit(model, loader(), steps=2, **kwargs)[0].close()
    latest = tmp_path / 'latest-rank0.pt'
    assert os.readlink(latest) == 'ba2.pt'
    with open(tmp_path / 'ba2.pt', 'r+b') as f:  # the process died while writing it
        f.truncate(os.path.getsize(tmp_path / 'ba2.pt') // 2)
    with pytest.warns(UserWarning, match=r'ba2\.pt is truncated.*resuming from the previous valid checkpoint .*ba1'):
        assert check_resumable(str(tmp_path)) == str(tmp_path / 'ba1.pt')
    assert os.readlink(latest) == 'ba1.pt' and (tmp_path / 'ba2.pt.corrupt').exists()
    trainer, _ = fit(make_model(seed=0), loader(), steps=3, autoresume=True, **kwargs)
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()
