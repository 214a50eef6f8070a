"""CLIPModel with the steered losses (core/steering): the batch's cached ref_* columns reach the loss; a missing
column fails naming it and `embed-reference`; JEST selects the same examples under a distillation loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from composer import Callback
from model_helpers import fit, make_model, series
from torch.utils.data import DataLoader, Dataset

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.steering import distill_sigmoid, drrho_sigmoid_loss, drrho_softmax_loss
from composer_jest.jest.algorithm import JEST

torch.set_num_threads(1)


class _Pool(Dataset):
    """Random images and captions with cached reference columns (as `embed-reference` writes them)."""

    def __init__(self, tokenizer, n: int = 32, dim: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 3, 32, 32, generator=g)
        words = ['red', 'blue', 'circle', 'square', 'big', 'small']
        self.text = tokenizer([' '.join(words[int(k)] for k in torch.randint(0, 6, (3,), generator=g))
                               for _ in range(n)])
        self.ref = {'ref_image_features': F.normalize(torch.randn(n, dim, generator=g), dim=-1).half(),
                    'ref_text_features': F.normalize(torch.randn(n, dim, generator=g), dim=-1).half(),
                    'ref_logit_scale': torch.full((n,), 10.0), 'ref_logit_bias': torch.full((n,), -10.0)}

    def __len__(self):
        return len(self.image)

    def __getitem__(self, i):
        return {'image': self.image[i], 'text': self.text[i], 'index': i, **{k: v[i] for k, v in self.ref.items()}}


def _batch(model, n=8):
    pool = _Pool(model.tokenizer, n)
    return next(iter(DataLoader(pool, batch_size=n)))


def _ref_cos(batch):
    """The reference's cosines from the float16 columns (renormalised in float32, as the loss does)."""
    x, y = (F.normalize(batch[k].float(), dim=-1) for k in CACHED_REFERENCE_KEYS[:2])
    return x @ y.T


def test_loss_reads_the_cached_columns():
    model = make_model({'name': 'drrho', 'form': 'sigmoid', 'tau': 0.5, 'distill': 0.25})
    batch = _batch(model)
    out = model(batch)
    loss = model.loss(out, batch)
    s = out['image_features'] @ out['text_features'].T
    lg = out['logit_scale'] * s + out['logit_bias']
    r = 10.0 * _ref_cos(batch) - 10.0
    expected = (drrho_sigmoid_loss(lg, r, 0.5) + 0.25 * distill_sigmoid(lg, r)) / 8
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.towers.clip.visual.conv1.weight.grad.abs().sum() > 0
    # the reference matters: other reference features, another loss
    batch2 = dict(batch, ref_text_features=batch['ref_text_features'].flip(0))
    assert abs(float(model.loss(model(batch2), batch2)) - float(loss)) > 1e-4


def test_softmax_drrho_uses_its_fixed_temperature():
    model = make_model({'name': 'drrho', 'form': 'softmax', 'tau': 0.1})
    assert not model.towers.clip.logit_scale.requires_grad  # τ fixed: the learned scale is unused
    batch = _batch(model)
    out = model(batch)
    s = out['image_features'] @ out['text_features'].T
    s_ref = _ref_cos(batch)
    torch.testing.assert_close(model.loss(out, batch), drrho_softmax_loss(s / 0.1, s_ref, 0.1) / 8, rtol=1e-5,
                               atol=1e-6)
    assert make_model({'name': 'distill', 'form': 'softmax'}).towers.clip.logit_scale.requires_grad


@pytest.mark.parametrize('missing', CACHED_REFERENCE_KEYS)
def test_missing_column_names_it_and_embed_reference(missing):
    model = make_model({'name': 'distill'})
    batch = _batch(model)
    del batch[missing]
    with pytest.raises(ValueError, match=rf"lacks \['{missing}'\].*`composer-jest embed-reference`"):
        model.loss(model(batch), batch)


class _Trained(Callback):
    """The index column of every trained batch (after JEST's selection)."""

    def __init__(self):
        self.indices = []

    def before_forward(self, state, logger):
        self.indices.append(state.batch['index'].tolist())


def test_jest_selection_is_unchanged_by_distillation():
    """Distillation is part of the training loss: JEST's first selection (same init, same super-batch) is the
    same with and without it, and the distilled run trains on a different loss."""
    runs = {}
    for name, loss in (('plain', 'sigmoid'), ('distill', {'name': 'distill', 'form': 'sigmoid', 'distill': 2.0})):
        model = make_model(loss, seed=0)
        seen = _Trained()
        loader = DataLoader(_Pool(model.tokenizer, 32), batch_size=16, shuffle=False)
        _, logger = fit(model, loader, 2, [JEST(reference='cached', filter_ratio=0.5, seed=0)], callbacks=[seen])
        runs[name] = (seen.indices, series(logger, 'loss/train/total'))
    assert runs['plain'][0][0] == runs['distill'][0][0] and len(runs['plain'][0][0]) == 8
    assert abs(runs['plain'][1][0] - runs['distill'][1][0]) > 1e-3
