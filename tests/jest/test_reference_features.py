"""ReferenceFeatures: a live reference gives a steered loss exactly what the cached columns give it."""

from __future__ import annotations

import pytest
import torch
from model_helpers import fit, make_model, series
from torch.utils.data import DataLoader, Dataset

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.jest.algorithm import JEST
from composer_jest.jest.reference_features import ReferenceFeatures, reference_columns
from composer_jest.models.clip import CLIPModel

torch.set_num_threads(1)

DISTILL = {'name': 'distill', 'form': 'sigmoid', 'distill': 1.0}


class _Pool(Dataset):
    """Random images and captions; with ``reference`` given, the reference's columns precomputed per example (as
    ``embed-reference`` caches them, in float32 here so that live and cached agree to rounding)."""

    def __init__(self, tokenizer, n: int = 32, seed: int = 0, reference: CLIPModel = None):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 3, 32, 32, generator=g)
        words = ['red', 'blue', 'circle', 'square', 'big', 'small']
        self.text = tokenizer([' '.join(words[int(k)] for k in torch.randint(0, 6, (3,), generator=g))
                               for _ in range(n)])
        self.ref = {}
        if reference is not None:
            with torch.no_grad():
                self.ref = reference_columns(reference.towers.eval()(self.image, self.text), n)

    def __len__(self):
        return len(self.image)

    def __getitem__(self, i):
        return {'image': self.image[i], 'text': self.text[i], 'index': i, **{k: v[i] for k, v in self.ref.items()}}


def _reference() -> CLIPModel:
    torch.manual_seed(5)  # test-only: the reference's init
    return CLIPModel('jest-tiny')


@pytest.mark.parametrize('with_jest', [False, True])
def test_live_reference_trains_exactly_as_its_cached_columns(with_jest):
    reference = _reference()
    losses, live = {}, None
    for kind in ('live', 'cached', 'other reference'):
        model = make_model(DISTILL, seed=0)
        other = CLIPModel('jest-tiny')  # another init
        pool = _Pool(model.tokenizer, 32, reference=reference if kind == 'cached' else None)
        algorithms = [JEST(reference=reference, filter_ratio=0.5, seed=0)] if with_jest else []
        # after JEST: the selected sub-batch only; on cached batches it must leave the columns alone
        algorithms.append(ReferenceFeatures(reference=reference if kind == 'live' else other))
        loader = DataLoader(pool, batch_size=16 if with_jest else 8, shuffle=False)
        trainer, logger = fit(model, loader, 3, algorithms)
        losses[kind] = series(logger, 'loss/train/total')
        if kind == 'live':
            live = (algorithms[-1], trainer.state.model)
    torch.testing.assert_close(losses['live'], losses['cached'], rtol=1e-5, atol=1e-6)
    # the reference is what the loss reads: another reference gives other losses from the first step
    assert abs(losses['other reference'][0] - losses['live'][0]) > 1e-3
    algo, model = live  # frozen, and not a part of the trained model (so never wrapped, optimised or checkpointed)
    assert not any(p.requires_grad for p in algo.towers.parameters())
    assert not any(m is algo.towers for m in model.modules())


def test_columns_are_the_cached_layout():
    feats = {'image_features': torch.eye(3), 'text_features': torch.eye(3).flip(0),
             'logit_scale': torch.tensor(7.0), 'logit_bias': torch.tensor(-2.0)}
    cols = reference_columns(feats, 3)
    assert list(cols) == list(CACHED_REFERENCE_KEYS)
    assert torch.equal(cols['ref_text_features'], torch.eye(3).flip(0))  # image and text not swapped
    assert cols['ref_logit_scale'].tolist() == [7.0] * 3 and cols['ref_logit_bias'].tolist() == [-2.0] * 3


@pytest.mark.parametrize('bad', [None, 'cached'])
def test_a_reference_that_is_not_a_model_is_refused_naming_the_fix(bad):
    with pytest.raises(ValueError, match=r'ReferenceFeatures.reference must be a model.*embed-reference'):
        ReferenceFeatures(reference=bad)


def test_yaml_run_with_a_steered_loss_and_a_live_reference(tmp_path):
    from omegaconf import OmegaConf

    from composer_jest.run.builders import build_trainer
    from composer_jest.run.config import load_config

    path = tmp_path / 'ref.pt'
    torch.save(_reference().towers.clip.state_dict(), path)  # a plain open_clip state_dict of the learner's arch
    raw = OmegaConf.load('yamls/quickstart.yaml')
    raw.algorithms = {'reference_features': {'reference': str(path)}}  # uniform batches, no JEST
    OmegaConf.save(raw, tmp_path / 'run.yaml')
    overrides = ['max_duration=2ba', 'eval_interval=2ba', 'progress_bar=false',
                 'model.loss={name: distill, form: sigmoid}']
    trainer = build_trainer(load_config(tmp_path / 'run.yaml', overrides))  # the demo batches have no ref_* columns
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2 and torch.isfinite(torch.as_tensor(trainer.state.loss)).all()
    # without the algorithm the same run fails at build, naming the fix
    raw.algorithms = {}
    OmegaConf.save(raw, tmp_path / 'run.yaml')
    with pytest.raises(ValueError, match=r'model.loss .*distill.* needs batch key.*reference_features'):
        build_trainer(load_config(tmp_path / 'run.yaml', overrides))
