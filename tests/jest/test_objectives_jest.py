"""The objectives inside the model, the yaml and JEST: each trains and scores by name, with false negatives masked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from composer.core import Event
from model_helpers import make_model
from test_algorithm_boundary import N, _batch, _Logger, _state
from test_objectives import SPECS, plain_loss

from composer_jest import JEST
from composer_jest.core.objectives import FalseNegatives, build_objective
from composer_jest.core.scoring import jest_select
from composer_jest.run.builders import build_model
from composer_jest.run.config import load_config


def labelled(step: int, tokenizer) -> dict:
    batch = _batch(step, tokenizer)
    batch['label'] = torch.arange(N) % 3  # every example shares its label with 5 others
    return batch


@pytest.mark.parametrize('spec', SPECS, ids=str)
def test_model_trains_with_every_loss_and_masks_false_negatives(spec, tokenizer):
    masked = {'name': spec, 'false_negatives': {'key': 'label'}} if isinstance(spec, str) else \
        {**spec, 'false_negatives': {'key': 'label'}}
    for loss in (spec, masked):
        model = make_model(loss=loss)
        assert build_objective(model.loss_name).spec() == build_objective(loss).spec()
        batch = labelled(0, tokenizer)
        out = model(batch)
        got = model.loss(out, batch)
        mask = FalseNegatives(key='label').mask(batch['label']) if loss is masked else None
        detached = {k: v.detach() for k, v in out.items()}
        assert float(got) == pytest.approx(plain_loss(spec, detached, mask), rel=1e-5, abs=1e-6), loss
        got.backward()
        assert model.towers.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_yaml_model_loss_takes_a_name_or_parameters():
    cfg = load_config(overrides=['model.loss={name: hcl, beta: 0.5, false_negatives: {key: label}}'])
    model = build_model(cfg.model)
    assert model.loss_name == {'name': 'hcl', 'beta': 0.5, 'tau_plus': 0.1, 'false_negatives': {'key': 'label',
                                                                                                  'modality': 'image'}}
    assert build_model(load_config(overrides=['model.loss=dcl']).model).loss_name == 'dcl'
    with pytest.raises(ValueError, match=r"model.loss: unknown parameter\(s\) \['betta'\] of loss 'hcl'"):
        load_config(overrides=['model.loss={name: hcl, betta: 0.5}'])
    with pytest.raises(ValueError, match=r"model.loss: unknown loss 'infonce'; registered losses: \['dcl', "):
        load_config(overrides=['model.loss=infonce'])


JEST_LOSSES = ['dcl', {'name': 'triplet', 'mining': 'semi-hard', 'false_negatives': {'key': 'label'}},
               {'name': 'softmax', 'false_negatives': {'threshold': 0.2, 'modality': 'either'}}]


@pytest.mark.parametrize('loss', JEST_LOSSES, ids=str)
def test_jest_scores_with_the_models_loss_and_its_false_negatives(loss, tokenizer):
    # JEST follows the model's loss (false negatives included) and draws what jest_select draws with that mask
    model, reference = make_model(loss=loss, seed=0), make_model(seed=1)
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=3)
    state = _state(model)
    jest.apply(Event.FIT_START, state, _Logger())
    batch = labelled(0, tokenizer)
    learner_f = model.score_features(batch)
    with torch.no_grad():
        reference_f = reference.score_features(batch)
    fn = build_objective(loss).false_negatives
    mask = fn.mask(fn.signature(batch, reference_f)) if fn is not None else None
    if fn is not None:
        assert mask.any() and not mask.all()  # the mask is not trivial on this batch
    generator = torch.Generator().manual_seed(jest.generator.initial_seed())
    expected = jest_select(learner_f, reference_f, N // 2, loss=loss, n_chunks=4, generator=generator, mask=mask)
    state.batch = batch
    jest.apply(Event.AFTER_DATALOADER, state, _Logger())
    assert torch.equal(jest.last_indices, expected.indices.sort().values)
    if fn is not None and fn.threshold is not None:  # the live reference's embeddings travel for the training mask
        assert torch.allclose(state.batch['ref_image_features'], reference_f['image_features'][jest.last_indices])
        train_mask = fn.mask(fn.signature(state.batch))
        assert torch.equal(train_mask, mask[jest.last_indices][:, jest.last_indices])
        model.loss(model(state.batch), state.batch).backward()  # the training loss reads them


def test_global_scope_refuses_losses_it_cannot_score(monkeypatch):
    import composer_jest.jest.algorithm as algorithm_module

    with pytest.raises(ValueError, match=r"loss \{'name': 'dcl', 'false_negatives': .* cannot be scored across ranks"):
        JEST(reference='cached', loss={'name': 'dcl', 'false_negatives': {'key': 'label'}}, scope='global')
    with pytest.raises(ValueError, match='without false_negatives'):
        JEST(reference='cached', loss={'name': 'sigmoid', 'false_negatives': {'key': 'label'}}, scope='global')
    for matrix_free in ({'name': 'softmax', 'temperature': 0.1}, 'dcl', 'hcl', 'triplet', 'npair'):
        JEST(reference='cached', loss=matrix_free, scope='global')
    # following the model's loss: refused at FIT_START, before any step
    monkeypatch.setattr(algorithm_module, 'dist', SimpleNamespace(get_global_rank=lambda: 0, get_world_size=lambda: 2))
    jest = JEST(score='hard_learner', scope='global')
    with pytest.raises(ValueError, match=r"loss \{'name': 'npair', 'negatives'.* cannot be scored across ranks"):
        jest.apply(Event.FIT_START, _state(make_model(loss={'name': 'npair', 'negatives': {'queue_size': 64}})),
                   _Logger())
