"""README claims about a JEST run: ``jest/scoring_time``, ``jest/flops_scoring`` and ``jest/flops_train`` are logged
every step; the live reference is the algorithm's, not the model's (so FSDP, which wraps ``state.model``'s
children, never wraps it, the optimizer never sees it and checkpoints never hold it).
"""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from model_helpers import make_model, series

from composer_jest import JEST
from composer_jest.data import shapes_dataloader

STEPS, N = 3, 16


def _modules_of(obj, depth: int = 4, seen=None) -> list[torch.nn.Module]:
    """Every ``nn.Module`` reachable from ``obj``'s attributes (dicts, lists, plain objects), ``depth`` levels down."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, '__dict__') and not isinstance(obj, (torch.Tensor, torch.Generator, type)):
        children = list(vars(obj).values())
    else:
        return []
    return [m for child in children for m in _modules_of(child, depth - 1, seen)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('claims-jest')
    model, reference = make_model(seed=0), make_model(seed=7)
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=2, seed=0)
    memory = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=shapes_dataloader(model.tokenizer, STEPS * N, N, seed=0),
                      max_duration=f'{STEPS}ba', algorithms=[jest], optimizers=torch.optim.AdamW(model.parameters()),
                      device='cpu', device_train_microbatch_size=N // 2, loggers=[memory], progress_bar=False,
                      log_to_console=False, save_folder=str(folder), save_interval=f'{STEPS}ba',
                      save_filename='final.pt', seed=0)
    trainer.fit()
    trainer.close()
    return trainer, jest, reference, memory, folder / 'final.pt'


@pytest.mark.parametrize('key', ['jest/scoring_time', 'jest/flops_scoring', 'jest/flops_train'])
def test_cost_metrics_are_logged_every_step(run, key):
    _, _, _, memory, _ = run
    values = series(memory, key)
    assert len(values) == STEPS and all(v > 0 for v in values), values
    if key != 'jest/scoring_time':  # analytic: the same shapes every step, the same count
        assert len(set(values)) == 1, values
    steps = [int(t.batch) for t, _ in memory.data[key]]
    assert steps == list(range(STEPS)) or steps == list(range(1, STEPS + 1)), steps


def test_the_live_reference_is_the_algorithms_not_the_models(run):
    trainer, jest, reference, _, checkpoint = run
    found = [m for m in _modules_of(jest) if any(True for _ in m.parameters())]
    assert found, 'the live reference module is held by the algorithm'
    ref_params = {id(p) for m in found for p in m.parameters()}
    model_modules = {id(m) for m in trainer.state.model.modules()}
    # not a submodule of state.model: FSDP (which wraps state.model's children) never reaches it
    assert not any(id(m) in model_modules for m in found)
    assert not ref_params & {id(p) for p in trainer.state.model.parameters()}
    # what scores is a frozen copy (the module the user passed is kept as the spec, untouched), never optimised
    scoring = [m for m in found if m is not reference]
    assert scoring and all(not p.requires_grad for m in scoring for p in m.parameters())
    optimised = {id(p) for opt in trainer.state.optimizers for g in opt.param_groups for p in g['params']}
    assert not ref_params & optimised
    # not checkpointed: the model entry is the learner's state dict, the algorithm's holds no float tensor
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)['state']
    assert set(state['model']) == set(trainer.state.model.state_dict())
    saved = [v for _, alg_state in state['algorithms'] for v in alg_state.values()
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert not saved, [v.shape for v in saved]
