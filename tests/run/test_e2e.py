"""End to end: a reference trained on clean shapes steers a JEST learner on noisy shapes (CPU, Trainer)."""

from __future__ import annotations

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from model_helpers import eval_metrics, fit, make_model, series

from composer_jest import JEST
from composer_jest.data import shapes_dataloader


class BatchSizes(Callback):
    """Records the size of the batch actually trained on (after JEST's AFTER_DATALOADER)."""

    def __init__(self):
        self.sizes: list[int] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self.sizes.append(int(state.batch['image'].shape[0]))


def test_reference_learned_the_clean_data(trained_reference, tokenizer):
    model, _ = trained_reference
    from composer import Trainer

    trainer = Trainer(model=model, eval_dataloader=shapes_dataloader(tokenizer, 512, 128, seed=99, shuffle=False),
                      progress_bar=False, log_to_console=False)
    trainer.eval()
    metrics = eval_metrics(trainer)
    # 6 shapes -> chance 1/6; 512 eval pairs -> chance recall@5 ~ 0.01
    assert metrics['ZeroShotAccuracy'] > 0.3, metrics
    assert metrics['ImageToTextRecall@5'] > 0.05, metrics


def test_jest_selects_clean_subbatches_and_learns(trained_reference, tokenizer):
    _, checkpoint = trained_reference
    steps, b, f = 40, 32, 0.5
    superbatch = int(b / (1 - f))
    jest = JEST(reference=str(checkpoint), filter_ratio=f, n_chunks=4, track_keys=('clean',), seed=0)
    sizes = BatchSizes()
    learner = make_model(seed=1)
    trainer, logger = fit(
        learner, shapes_dataloader(tokenizer, steps * superbatch, superbatch, noise=0.5, seed=2), steps=steps,
        algorithms=[jest], callbacks=[sizes], warmup=10,
        eval_loader=shapes_dataloader(tokenizer, 256, 128, seed=99, shuffle=False),
    )
    assert sizes.sizes == [b] * steps
    assert series(logger, 'jest/examples_seen')[-1] == steps * superbatch
    assert series(logger, 'jest/examples_trained')[-1] == steps * b
    assert trainer.state.timestamp.sample == steps * superbatch  # Composer still counts examples seen

    # The reference knows clean pairs, so the selected half is enriched in them.
    selected, pool = series(logger, 'jest/selected/clean'), series(logger, 'jest/superbatch/clean')
    assert sum(selected) / steps > sum(pool) / steps + 0.15, (sum(selected) / steps, sum(pool) / steps)
    assert sum(series(logger, 'jest/learnability_selected')) > sum(series(logger, 'jest/learnability_superbatch'))
    assert all(t > 0 for t in series(logger, 'jest/scoring_time'))

    loss = series(logger, 'loss/train/total')
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5, loss
    # 40 steps are too few for zero-shot accuracy to leave chance (test_learning_efficiency covers that)
    assert any(k.startswith('metrics/eval/ZeroShotAccuracy') for k in logger.data)


def test_jest_resume_restores_sampler_and_counters(trained_reference, tokenizer, tmp_path):
    _, checkpoint = trained_reference

    def run(steps, **kwargs):
        jest = JEST(reference=str(checkpoint), filter_ratio=0.5, n_chunks=2, seed=5)
        learner = make_model(seed=1)
        loader = shapes_dataloader(tokenizer, 12 * 32, 32, noise=0.5, seed=3)
        trainer, logger = fit(learner, loader, steps=steps, algorithms=[jest], warmup=2, **kwargs)
        return jest, trainer, logger

    full_jest, _, full_log = run(6)
    run(3, save_folder=str(tmp_path), save_interval='3ba', save_filename='ckpt.pt')
    resumed_jest, _, resumed_log = run(6, load_path=str(tmp_path / 'ckpt.pt'))
    assert resumed_jest.examples_seen == full_jest.examples_seen == 6 * 32
    assert torch.equal(resumed_jest.last_indices, full_jest.last_indices)
    assert torch.allclose(torch.tensor(series(resumed_log, 'loss/train/total')),
                          torch.tensor(series(full_log, 'loss/train/total')[3:]), atol=1e-5)
