"""The negatives queue: the loss counts it, the momentum copy fills it, JEST scores with it, a checkpoint resumes it."""

from __future__ import annotations

import pytest
import torch
from composer.core import Event
from model_helpers import fit, make_model
from test_algorithm_boundary import N, _batch, _Logger, _state
from test_objectives import plain_loss

from composer_jest import JEST
from composer_jest.core.objectives import QUEUE_KEYS, build_objective
from composer_jest.core.scoring import jest_select
from composer_jest.data import shapes_dataloader

QUEUE = {'name': 'dcl', 'negatives': {'queue_size': 40, 'momentum': 0.9}}


def test_loss_counts_the_queue_and_the_momentum_copy_fills_it(tokenizer):
    model = make_model(loss=QUEUE)
    queue = model.negatives
    for step in range(3):
        batch = _batch(step, tokenizer)
        before = {k: v.clone() for k, v in queue.features().items()}
        params_before = [p.detach().clone() for p in queue.towers.parameters()]
        out = model(batch)
        loss = model.loss(out, batch)
        features = {**{k: v.detach() for k, v in out.items()}, **before}
        assert float(loss) == pytest.approx(plain_loss(QUEUE, features), rel=1e-5)  # with the queue as it was
        loss.backward()
        # the copy moved to m θ_m + (1 - m) θ (the first time: θ), and embedded the batch into the next N slots
        m = 0.0 if step == 0 else 0.9
        for p_m, p0, p in zip(queue.towers.parameters(), params_before, model.towers.parameters()):
            assert torch.allclose(p_m, m * p0 + (1 - m) * p.detach(), atol=1e-6)
        with torch.no_grad():
            expected = queue.towers(batch['image'], batch['text'])
        slots = torch.arange(step * N, (step + 1) * N) % 40
        assert torch.allclose(queue.queue_image[slots], expected['image_features'], atol=1e-6)
        assert torch.allclose(queue.queue_text[slots], expected['text_features'], atol=1e-6)
        assert int(queue.valid.sum()) == min(40, (step + 1) * N) and int(queue.position) == (step + 1) * N % 40
    with_queue = model.loss(model(batch), batch)
    model.negatives = None
    assert float(with_queue) != pytest.approx(float(model.loss(model(batch), batch)), rel=1e-3)  # it matters


def test_jest_scores_count_the_learners_queue(tokenizer):
    model, reference = make_model(loss=QUEUE, seed=0), make_model(seed=1)
    for step in range(2):  # fill part of the queue
        batch = _batch(step, tokenizer)
        model.loss(model(batch), batch)
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=3)
    state = _state(model)
    jest.apply(Event.FIT_START, state, _Logger())
    batch = _batch(5, tokenizer)
    with torch.no_grad():
        learner_f = model.score_features(batch)
    assert all(torch.equal(learner_f[k], v) for k, v in model.negatives.features().items())
    with torch.no_grad():
        reference_f = reference.score_features(batch)
    seed = jest.generator.initial_seed()
    expected = jest_select(learner_f, reference_f, N // 2, loss=QUEUE, n_chunks=4,
                           generator=torch.Generator().manual_seed(seed))
    no_queue = jest_select({k: v for k, v in learner_f.items() if k not in QUEUE_KEYS}, reference_f, N // 2, loss=QUEUE,
                           n_chunks=4, generator=torch.Generator().manual_seed(seed))
    assert float(expected.stats['learnability_selected']) != pytest.approx(
        float(no_queue.stats['learnability_selected']), rel=1e-3)
    state.batch = batch
    jest.apply(Event.AFTER_DATALOADER, state, _Logger())
    assert torch.equal(jest.last_indices, expected.indices.sort().values)
    with pytest.raises(ValueError, match='without false_negatives or a negatives queue'):
        JEST(reference=reference, loss=QUEUE, scope='global')


def test_queue_is_checkpointed_and_resumes_exactly(tmp_path, tokenizer):
    def run(steps, **kwargs):
        model = make_model(loss=QUEUE, seed=0)
        loader = shapes_dataloader(tokenizer, 6 * 16, 16, noise=0.3, seed=2)
        jest = JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2, seed=1)
        trainer, _ = fit(model, loader, steps, algorithms=[jest], warmup=1, **kwargs)
        trainer.close()
        return model

    straight = run(4)
    run(2, save_folder=str(tmp_path), save_interval='2ba', save_filename='ck.pt')
    resumed = run(4, load_path=str(tmp_path / 'ck.pt'))
    assert int(straight.negatives.valid.sum()) == 32  # 4 steps x 8 trained examples
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name  # towers, momentum copy and queue alike
    spec = build_objective(QUEUE).spec()
    assert straight.loss_name == spec and spec['negatives'] == {'queue_size': 40, 'momentum': 0.9}
