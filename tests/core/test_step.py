"""The functional selection step (core/step.py): the same draw as the scoring core, plus the step's own jobs
(sub-batch size, false-negative mask, scope, statistics, finiteness), with no Composer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import jest_select
from composer_jest.core.step import SelectionSettings, compile_options, select_step

N = 24


def features(seed: int, n: int = N, d: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {'image_features': F.normalize(torch.randn(n, d, generator=g), dim=-1),
            'text_features': F.normalize(torch.randn(n, d, generator=g), dim=-1),
            'logit_scale': torch.tensor(10.0), 'logit_bias': torch.tensor(-5.0)}


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {'image': torch.randn(N, 3, 4, 4, generator=g), 'label': torch.randint(0, 5, (N,), generator=g),
            'clean': (torch.arange(N) % 4 == 0).long()}


@pytest.mark.parametrize('loss, selection, score', [('sigmoid', 'joint', 'learnability'),
                                                    ('softmax', 'independent', 'learnability'),
                                                    ('dcl', 'joint', 'hard_learner')])
def test_the_step_draws_what_jest_select_draws(loss, selection, score):
    """b = round(N (1 - f)); the same generator state gives jest_select's picks (sorted: the loader's order), its
    draw order and its statistics, and the generator advances the same."""
    learner, reference = features(1), features(2)
    settings = SelectionSettings(filter_ratio=0.75, n_chunks=3, score=score, selection=selection, loss=loss)
    g_step, g_core = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    step = select_step(batch(), settings, g_step, learner=learner,
                       reference=reference if score == 'learnability' else None)
    core = jest_select(learner, reference if score == 'learnability' else None, 6, score=score, selection=selection,
                       loss=loss, n_chunks=3, generator=g_core)
    assert step.indices.tolist() == sorted(core.indices.tolist()) and step.num_items == N
    assert torch.equal(step.global_indices, core.global_indices)
    assert step.stats == {k: float(v) for k, v in core.stats.items()}
    assert torch.equal(g_step.get_state(), g_core.get_state())


def test_callables_are_called_once_with_the_batch_and_cached_features_pass_through():
    seen = []

    def learner(b):
        seen.append(b)
        return features(1)

    the_batch = batch()
    settings = SelectionSettings(filter_ratio=0.5, n_chunks=2, loss='sigmoid')
    called = select_step(the_batch, settings, torch.Generator().manual_seed(0), learner=learner, reference=features(2))
    given = select_step(the_batch, settings, torch.Generator().manual_seed(0), learner=features(1),
                        reference=features(2))
    assert len(seen) == 1 and seen[0] is the_batch
    assert torch.equal(called.indices, given.indices) and called.stats == given.stats


def test_false_negatives_of_the_scoring_loss_mask_the_draw():
    """A loss with false negatives by label: the step builds the [N, N] mask from the batch column itself."""
    loss = {'name': 'softmax', 'false_negatives': {'key': 'label'}}
    learner, reference, the_batch = features(1), features(2), batch(3)
    step = select_step(the_batch, SelectionSettings(filter_ratio=0.5, n_chunks=3, loss=loss),
                       torch.Generator().manual_seed(4), learner=learner, reference=reference)
    fn = build_objective(loss).false_negatives
    mask = fn.mask(fn.signature(the_batch))
    masked = jest_select(learner, reference, 12, loss=loss, n_chunks=3, generator=torch.Generator().manual_seed(4),
                         mask=mask)
    unmasked = jest_select(learner, reference, 12, loss='softmax', n_chunks=3,
                           generator=torch.Generator().manual_seed(4))
    assert step.stats == {k: float(v) for k, v in masked.stats.items()}
    assert step.stats != {k: float(v) for k, v in unmasked.stats.items()}  # the mask changes the scores


def test_uniform_takes_n_from_the_batch_and_track_keys_are_means():
    the_batch = batch()
    step = select_step(the_batch, SelectionSettings(filter_ratio=0.75, score='uniform', loss='sigmoid'),
                       torch.Generator().manual_seed(0), track_keys=('clean',))
    assert step.indices.numel() == 6 and step.indices.unique().numel() == 6 and step.num_items == N
    clean = the_batch['clean'].float()
    assert step.stats == {'superbatch/clean': float(clean.mean()), 'selected/clean': float(clean[step.indices].mean())}
    with pytest.raises(KeyError, match="track_keys: 'dup' is not a batch key.*--keep-columns dup"):
        select_step(the_batch, SelectionSettings(score='uniform', loss='sigmoid'), torch.Generator(),
                    track_keys=('dup',))


def test_scope_decides_whether_the_ranks_select_together():
    """Local scope ignores the world it is handed (no gather); global draws one selection over both ranks."""
    calls = []

    def all_gather(t):
        calls.append(t.shape)
        return [t.clone(), t.clone()]

    learner, reference = features(1), features(2)
    kwargs = dict(learner=learner, reference=reference, rank=1, world_size=2, all_gather=all_gather)
    local = select_step({}, SelectionSettings(filter_ratio=0.5, n_chunks=2, loss='sigmoid'),
                        torch.Generator().manual_seed(0), **kwargs)
    assert not calls and local.global_indices.max() < N
    glob = select_step({}, SelectionSettings(filter_ratio=0.5, n_chunks=2, loss='sigmoid', scope='global'),
                       torch.Generator().manual_seed(0), **kwargs)
    assert calls and glob.global_indices.numel() == N and glob.global_indices.max() >= N
    mine = glob.global_indices[glob.global_indices >= N] - N
    assert torch.equal(glob.indices, mine.sort().values)


def test_non_finite_features_are_reported_after_the_draw():
    bad = features(1)
    bad['image_features'][3, 0] = float('nan')
    settings = SelectionSettings(filter_ratio=0.5, n_chunks=2, loss='sigmoid')
    with pytest.raises(FloatingPointError, match="\\['image_features'\\] from the learner features"):
        select_step({}, settings, torch.Generator(), learner=bad, reference=features(2))
    seen = []
    select_step({}, settings, torch.Generator(), learner=bad, reference=features(2),
                on_non_finite=lambda learner, reference: seen.append(learner is bad))
    assert seen == [True]


@pytest.mark.parametrize('kwargs, match', [
    (dict(filter_ratio=1.0), r'filter_ratio must be a float in \[0, 1\)'),
    (dict(n_chunks=True), 'n_chunks must be an int >= 1'),
    (dict(score='easy'), 'score must be one of'),
    (dict(scope='world'), "scope must be one of \\('local', 'global'\\)"),
    (dict(temperature=float('inf')), 'temperature must be a finite float > 0'),
    (dict(loss={'name': 'softmax', 'false_negatives': {'key': 'label'}}, scope='global'), 'cannot be scored across'),
])
def test_settings_are_checked_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionSettings(**kwargs)


def test_an_unresolved_loss_and_a_wrong_compile_flag_are_named():
    with pytest.raises(ValueError, match='SelectionSettings.loss is None'):
        select_step({}, SelectionSettings(), torch.Generator(), learner=features(1), reference=features(2))
    assert compile_options(False, 'x') is None and compile_options(True, 'x') == {}
    with pytest.raises(ValueError, match="compile_scoring must be True, False or a dict .*got 'yes'"):
        compile_options('yes', 'compile_scoring')
