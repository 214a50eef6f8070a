"""JEST at the Composer boundary, driven by events on a minimal state (fast; no Trainer).

What the algorithm promises Composer: FIT_START restores the sampler's generator from a loaded state dict;
AFTER_DATALOADER leaves exactly ``b`` rows of the super-batch, in the loader's order; the trained batch is not
split into microbatches unless asked for.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from composer.core import Event
from composer.devices import DeviceCPU
from model_helpers import make_model

from composer_jest import JEST

N = 16


class _Logger:
    def __init__(self):
        self.metrics: list[dict] = []

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.append(dict(metrics))


def _state(model, microbatch: int = N) -> SimpleNamespace:
    return SimpleNamespace(model=model, device=DeviceCPU(), precision='fp32', precision_config=None,
                           dataloader=SimpleNamespace(batch_size=N), device_train_microbatch_size=microbatch,
                           batch=None, fsdp_enabled=False)


def _batch(step: int, tokenizer) -> dict:
    g = torch.Generator().manual_seed(step)
    words = ['red', 'green', 'blue', 'circle', 'square', 'star']
    captions = [' '.join(words[int(i)] for i in torch.randint(0, 6, (3,), generator=g)) for _ in range(N)]
    return {'image': torch.randn(N, 3, 32, 32, generator=g), 'text': tokenizer(captions),
            'index': torch.randperm(1000, generator=g)[:N]}


def _steps(jest: JEST, state, steps: range) -> list[list[int]]:
    out = []
    for step in steps:
        state.batch = _batch(step, state.model.tokenizer)
        jest.apply(Event.AFTER_DATALOADER, state, _Logger())
        out.append(state.batch['index'].tolist())
    return out


def test_fit_start_restores_the_generator_from_a_loaded_state_dict():
    model, reference = make_model(seed=0), make_model(seed=1)
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=3)
    state = _state(model)
    jest.apply(Event.FIT_START, state, _Logger())
    first = _steps(jest, state, range(2))
    saved = jest.state_dict()
    uninterrupted = _steps(jest, state, range(2, 4))

    resumed = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=3)
    resumed.load_state_dict(saved)  # Composer loads the checkpoint before FIT_START
    resumed.apply(Event.FIT_START, state, _Logger())
    assert _steps(resumed, state, range(2, 4)) == uninterrupted
    assert (resumed.examples_seen, resumed.examples_trained) == (4 * N, 4 * N // 2)  # counters restored too
    fresh = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, seed=3)
    fresh.apply(Event.FIT_START, state, _Logger())
    assert _steps(fresh, state, range(2, 4)) != uninterrupted  # without the restore the draws differ
    assert first != uninterrupted


def test_after_dataloader_keeps_b_rows_in_loader_order():
    model = make_model(seed=0)
    jest = JEST(score='hard_learner', filter_ratio=0.75, n_chunks=2, seed=0)
    state = _state(model)
    jest.apply(Event.FIT_START, state, _Logger())
    state.batch = _batch(0, model.tokenizer)
    original = {k: v.clone() for k, v in state.batch.items()}
    logger = _Logger()
    jest.apply(Event.AFTER_DATALOADER, state, logger)
    kept = jest.last_indices
    assert kept.numel() == N // 4 and torch.equal(kept, kept.sort().values)  # loader order, not draw order
    for key, value in original.items():
        assert torch.equal(state.batch[key], value[kept])  # every column of exactly those rows
    assert logger.metrics[-1]['jest/examples_trained'] == N // 4


def test_fit_start_caps_the_microbatch_at_the_trained_batch():
    model = make_model(seed=0)
    state = _state(model, microbatch=N)
    JEST(score='hard_learner', filter_ratio=0.75).apply(Event.FIT_START, state, _Logger())
    assert state.device_train_microbatch_size == N // 4
    state = _state(model, microbatch=2)  # a smaller microbatch the user asked for is kept
    JEST(score='hard_learner', filter_ratio=0.75).apply(Event.FIT_START, state, _Logger())
    assert state.device_train_microbatch_size == 2


def test_global_scope_passes_rank_and_gather_to_the_core(monkeypatch):
    """Rank 1 of 2 (simulated: the other rank streamed the same super-batch): one global draw over 2N, of which
    rank 1 keeps the picks in its own half, and the counters count both ranks."""
    import composer_jest.jest.algorithm as algorithm_module

    gathered = []

    def all_gather(tensor):
        gathered.append(tuple(tensor.shape))
        return [tensor.clone(), tensor.clone()]

    fake = SimpleNamespace(get_global_rank=lambda: 1, get_world_size=lambda: 2, all_gather=all_gather)
    monkeypatch.setattr(algorithm_module, 'dist', fake)
    model, reference = make_model(seed=0), make_model(seed=1)
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=4, scope='global', seed=3)
    state = _state(model)
    jest.apply(Event.FIT_START, state, _Logger())
    state.batch = _batch(0, model.tokenizer)
    logger = _Logger()
    jest.apply(Event.AFTER_DATALOADER, state, logger)
    assert gathered, 'global scope must gather the chosen chunks'
    global_picks = jest.last_global_indices
    assert global_picks.numel() == N and global_picks.unique().numel() == N  # b = 8 per rank, 2 ranks
    mine = global_picks[global_picks >= N] - N
    assert torch.equal(jest.last_indices, mine.sort().values) and mine.numel() == N // 2
    assert logger.metrics[-1]['jest/examples_seen'] == 2 * N
