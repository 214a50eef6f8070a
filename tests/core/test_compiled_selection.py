"""The selection after its generator draw is one graph with no host sync, and a compiled one draws the same."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from composer import Trainer
from composer.optim import DecoupledAdamW

from composer_jest import JEST, CLIPModel
from composer_jest.core import scoring
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import _select, jest_select
from composer_jest.core.selection import selection_noise

N, D, B = 48, 8, 12


def features(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {'image_features': F.normalize(torch.randn(N, D, generator=g), dim=-1),
            'text_features': F.normalize(torch.randn(N, D, generator=g), dim=-1),
            'logit_scale': torch.tensor(10.), 'logit_bias': torch.tensor(-10.)}


CASES = [('sigmoid', None), ('softmax', None), ('dcl', None), ('triplet', None), ('sigmoid', 'mask')]


@pytest.mark.parametrize('loss,mask', CASES)
@pytest.mark.parametrize('joint', [True, False])
def test_selection_core_is_one_graph_without_host_syncs(loss, mask, joint):
    """dynamo breaks the graph at every host read (``.item()``, ``bool(tensor)``, ``.tolist()``): none may creep in."""
    objective = build_objective(loss)
    mask = torch.eye(N, dtype=torch.bool) if mask else None
    noise = selection_noise(torch.Generator().manual_seed(0), 0, B, 4, joint, N, 'cpu')
    dynamo.reset()
    explained = dynamo.explain(_select)(
        features(1), features(2), B, noise, objective=objective, score='learnability', joint=joint, track=True,
        dense=mask is not None, n_chunks=4, temperature=1.0, rank=0, world_size=1, all_gather=None, mask=mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize('loss,mask', CASES)
def test_compiled_selection_draws_what_eager_draws(loss, mask):
    mask = torch.eye(N, dtype=torch.bool) if mask else None
    runs = {}
    dynamo.reset()
    for compile in (None, {'backend': 'eager', 'fullgraph': True}):
        generator = torch.Generator().manual_seed(3)
        picks = [jest_select(features(1 + step), features(7 + step), B, loss=loss, n_chunks=4, generator=generator,
                             mask=mask, compile=compile) for step in range(2)]
        runs[compile is None] = picks, generator.get_state()
    (eager, eager_state), (compiled, compiled_state) = runs[True], runs[False]
    assert torch.equal(eager_state, compiled_state)  # one draw from the generator per selection, either way
    for e, c in zip(eager, compiled):
        assert torch.equal(e.indices, c.indices) and torch.equal(e.global_indices, c.global_indices)
        assert e.stats.keys() == c.stats.keys() == {'learnability_superbatch', 'learnability_selected'}
        for key in e.stats:
            torch.testing.assert_close(e.stats[key], c.stats[key])
    assert not torch.equal(eager[0].indices, eager[1].indices)


def test_compiled_selection_takes_new_sizes_and_temperatures():
    """A second super-batch size or temperature in one process is a new static graph, not a failed symbolic one."""
    dynamo.reset()
    scoring._COMPILED.clear()
    options = {'backend': 'eager', 'fullgraph': True}
    for n, b, temperature in ((48, 12, 1.0), (40, 10, 1.0), (48, 12, 0.5), (32, 8, 2.0)):
        feats = [{k: (v[:n] if v.dim() else v) for k, v in features(seed).items()} for seed in (4, 5)]
        picks = [jest_select(*feats, b, n_chunks=4, temperature=temperature, compile=compile,
                             generator=torch.Generator().manual_seed(n)) for compile in (None, options)]
        assert torch.equal(picks[0].indices, picks[1].indices), (n, temperature)
        torch.testing.assert_close(picks[0].stats['learnability_selected'], picks[1].stats['learnability_selected'])


def test_jest_compile_selection_trains_on_the_eager_selection():
    torch.manual_seed(0)
    reference = CLIPModel('jest-tiny')
    g = torch.Generator().manual_seed(1)
    batches = [{'image': torch.randn(16, 3, 32, 32, generator=g),
                'text': reference.tokenizer([f'a photo of thing {i}' for i in range(16)])} for _ in range(2)]
    picked = {}
    dynamo.reset()
    scoring._COMPILED.clear()
    for compile in (False, {'backend': 'eager'}):
        torch.manual_seed(0)
        learner = CLIPModel('jest-tiny')
        jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=2, seed=0, compile_selection=compile)
        trainer = Trainer(model=learner, train_dataloader=batches, max_duration='2ba',
                          optimizers=DecoupledAdamW(learner.parameters(), lr=1e-2), algorithms=[jest], device='cpu',
                          device_train_microbatch_size=8, progress_bar=False, log_to_console=False)
        trainer.fit()
        picked[bool(compile)] = jest.last_global_indices.tolist()
    assert picked[True] == picked[False] and len(picked[True]) == 8
    assert list(scoring._COMPILED) == [repr([('backend', 'eager')])]  # the compiled path really ran
    with pytest.raises(ValueError, match='compile_selection'):
        JEST(reference=reference, compile_selection='yes')
