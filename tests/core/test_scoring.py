"""The blockwise scoring core equals the dense reference: same indices, same conditionals, same statistics.

The dense reference builds the ``N_g x N_g`` matrices of the concatenated super-batch and runs
``joint_sample`` / ``independent_sample`` with one group per rank; the blockwise path runs on 1, 2 and 4
gloo processes, each holding only its own ``N`` candidates.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from composer_jest.core import blockwise
from composer_jest.core.losses import SoftmaxScorer, pair_logits, sigmoid_pair_loss, softmax_set_loss
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import STAT_BLOCK, conditional_scorer, jest_select
from composer_jest.core.selection import (
    SCORE_METHODS,
    SCORE_TERMS,
    PairScorer,
    batch_score,
    independent_sample,
    joint_sample,
    score_matrix,
)

N_LOCAL, B_LOCAL, N_CHUNKS, DIM = 13, 5, 3, 8  # N not a multiple of the chunk count; chunks of 2, 2, 1
# the other objectives run through the generic anchor scorer (composer_jest.core.objectives); their dense reference is
# the objective's own AnchorScorer / per_example on the concatenated super-batch
ANCHOR_LOSSES = ('dcl', 'hcl', 'npair', 'triplet', 'triplet-semi-hard')
LOSS_SPECS = {'triplet-semi-hard': {'name': 'triplet', 'mining': 'semi-hard'}}
CASES = list(itertools.product(('joint', 'independent'), ('sigmoid', 'softmax') + ANCHOR_LOSSES, SCORE_METHODS))


def global_features(world: int, seed: int) -> tuple[dict, dict]:
    """Learner and reference features of the concatenated super-batch (N_LOCAL per rank)."""
    g = torch.Generator().manual_seed(seed)
    n = N_LOCAL * world

    def model(scale, bias):
        x = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
        y = F.normalize(x + torch.randn(n, DIM, generator=g), dim=-1)  # correlated pairs
        return {'image_features': x, 'text_features': y, 'logit_scale': torch.tensor(scale),
                'logit_bias': torch.tensor(bias)}

    return model(8.0, -3.0), model(12.0, -5.0)


def local(features: dict, rank: int) -> dict:
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return {**features, 'image_features': features['image_features'][rows],
            'text_features': features['text_features'][rows]}


def used(score: str, learner: dict, reference: dict) -> tuple:
    """What the algorithm passes: the features of the models the score uses (learnability: both)."""
    names = dict(SCORE_TERMS[score])
    if not names:  # uniform: the algorithm passes (dummy) learner features to take N from
        return learner, None
    return (learner if 'learner' in names else None), (reference if 'reference' in names else None)


def dense_select(learner, reference, world, selection, loss, score, seed, temperature=1.0) -> tuple:
    """The dense reference: N_g x N_g matrices, one group per rank; brute-force statistics."""
    n, b = N_LOCAL * world, B_LOCAL * world
    gen = torch.Generator().manual_seed(seed)
    if loss == 'sigmoid':
        losses = {k: sigmoid_pair_loss(**f) if f is not None else None
                  for k, f in (('learner', learner), ('reference', reference))}
        scores = score_matrix(score, losses['learner'], losses['reference'])
    elif score == 'uniform':
        scores = PairScorer(torch.zeros(n, n))
    elif loss in ANCHOR_LOSSES:
        obj = build_objective(LOSS_SPECS.get(loss, loss))
        given = {'learner': learner, 'reference': reference}
        terms = [(obj.logits(given[k]), w, obj.scale(given[k])) for k, w in SCORE_TERMS[score]]
        if selection == 'joint':
            scores = obj.scorer(terms)
        else:  # each example's loss within its own rank's super-batch
            per_example = torch.zeros(n)
            for r in range(world):
                blk = torch.arange(r * N_LOCAL, (r + 1) * N_LOCAL)
                for lg, w, s in terms:
                    per_example[blk] += w * obj.per_example(lg[blk][:, blk], scale=s)
            scores = torch.diag(per_example)
    else:
        logits = {k: pair_logits(f['image_features'], f['text_features'], f['logit_scale'])
                  for k, f in (('learner', learner), ('reference', reference)) if f is not None}
        terms = [(logits[k], w) for k, w in SCORE_TERMS[score]]
        if selection == 'joint':
            scores = SoftmaxScorer(terms)
        else:  # each example's loss within its own rank's super-batch
            per_example = torch.zeros(n)
            for r in range(world):
                blk = torch.arange(r * N_LOCAL, (r + 1) * N_LOCAL)
                for lg, w in terms:
                    sub = lg[blk][:, blk]
                    per_example[blk] += w * 0.5 * (sub.logsumexp(1) + sub.logsumexp(0) - 2 * torch.diagonal(sub))
            scores = torch.diag(per_example)
    if selection == 'joint':
        idx = joint_sample(scores, b, N_CHUNKS, gen, n_groups=world, temperature=temperature)
    else:
        idx = independent_sample(scores, b, gen, n_groups=world, temperature=temperature)
    stats = {}
    if learner is not None and reference is not None:
        stats = brute_force_stats(learner, reference, idx, world, loss)
    return idx, stats


def brute_force_stats(learner, reference, idx, world, loss) -> dict:
    b = idx.numel()
    if loss == 'sigmoid':
        s = sigmoid_pair_loss(**learner) - sigmoid_pair_loss(**reference)
        off, count = 0.0, 0
        for r in range(world):
            for start in range(0, N_LOCAL, STAT_BLOCK):
                blk = torch.arange(r * N_LOCAL + start, r * N_LOCAL + min(start + STAT_BLOCK, N_LOCAL))
                sub = s[blk][:, blk]
                off += float(sub.sum() - torch.diagonal(sub).sum())
                count += blk.numel() * (blk.numel() - 1)
        uniform = float(torch.diagonal(s).mean()) + (b - 1) * off / count
        selected = float(batch_score(s, idx)) / b
    elif loss in ANCHOR_LOSSES:
        obj = build_objective(LOSS_SPECS.get(loss, loss))

        def value(indices):
            return float(obj.set_loss(obj.logits(learner), indices, scale=obj.scale(learner))
                         - obj.set_loss(obj.logits(reference), indices, scale=obj.scale(reference)))

        blocks = [torch.arange(r * N_LOCAL + k * B_LOCAL, r * N_LOCAL + (k + 1) * B_LOCAL)
                  for r in range(world) for k in range(N_LOCAL // B_LOCAL)]
        uniform = sum(value(blk) for blk in blocks) / (len(blocks) * B_LOCAL)
        selected = value(idx) / b
    else:
        ll = pair_logits(learner['image_features'], learner['text_features'], learner['logit_scale'])
        lr = pair_logits(reference['image_features'], reference['text_features'], reference['logit_scale'])
        blocks = [torch.arange(r * N_LOCAL + k * B_LOCAL, r * N_LOCAL + (k + 1) * B_LOCAL)
                  for r in range(world) for k in range(N_LOCAL // B_LOCAL)]
        uniform = sum(float(softmax_set_loss(ll, blk) - softmax_set_loss(lr, blk)) for blk in blocks)
        uniform /= len(blocks) * B_LOCAL
        selected = float(softmax_set_loss(ll, idx) - softmax_set_loss(lr, idx)) / b
    return {'learnability_superbatch': uniform, 'learnability_selected': selected}


def blockwise_all_cases(rank: int, world: int, all_gather, seed: int) -> list:
    learner, reference = global_features(world, seed)
    out = []
    for selection, loss, score in CASES:
        lf, rf = used(score, local(learner, rank), local(reference, rank))
        sel = jest_select(lf, rf, B_LOCAL, score=score, selection=selection, loss=LOSS_SPECS.get(loss, loss),
                          n_chunks=N_CHUNKS,
                          generator=torch.Generator().manual_seed(seed), rank=rank, world_size=world,
                          all_gather=all_gather)
        out.append((sel.indices, sel.global_indices, {k: float(v) for k, v in sel.stats.items()}))
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, seed: int) -> None:
    """One gloo rank: the world-size-4 draw on all ranks, the world-size-2 draw on ranks 0 and 1."""
    torch.set_num_threads(1)
    torch_dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=120))

    def gatherer(group, size):
        def all_gather(t):
            out = [torch.empty_like(t) for _ in range(size)]
            torch_dist.all_gather(out, t, group=group)
            return out
        return all_gather

    blockwise.BLOCK_ELEMENTS = 3 * N_LOCAL  # blocks of 3 gathered rows: the multi-block paths run too
    try:
        pair = torch_dist.new_group([0, 1])  # every rank takes part in creating it
        results = {world: blockwise_all_cases(rank, world, gatherer(None, world), seed + world)}
        if rank < 2:
            results[2] = blockwise_all_cases(rank, 2, gatherer(pair, 2), seed + 2)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope='module')
def gloo_results() -> dict[int, list[list]]:
    """Results per world size (1, 2, 4), per rank: four gloo processes spawned once."""
    world, seed = 4, 11
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_worker, args=(world, os.path.join(tmp, 'init'), tmp, seed), nprocs=world,
                                     start_method='spawn', join=False)
        deadline = time.monotonic() + 300
        while not context.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f'{world} gloo ranks did not finish in 300 s')
        ranks = [torch.load(os.path.join(tmp, f'rank{r}.pt')) for r in range(world)]
    return {1: [blockwise_all_cases(0, 1, None, seed + 1)], 2: [r[2] for r in ranks[:2]], 4: [r[4] for r in ranks]}


def test_small_blocks_give_the_same_draws_and_statistics(monkeypatch):
    # one rank, every product split into blocks of 2 rows (sigmoid/softmax updates, normalisers, statistics)
    default = blockwise_all_cases(0, 1, None, 5)
    monkeypatch.setattr(blockwise, 'BLOCK_ELEMENTS', 2 * N_LOCAL)
    for (selection, loss, score), small, big in zip(CASES, blockwise_all_cases(0, 1, None, 5), default):
        assert torch.equal(small[0], big[0]), (selection, loss, score)
        assert small[2] == pytest.approx(big[2], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize('world', [1, 2, 4])
def test_blockwise_draws_the_dense_indices_on_every_rank(world, gloo_results):
    seed = 11 + world
    per_rank = gloo_results[world]
    learner, reference = global_features(world, seed)
    for case, (selection, loss, score) in enumerate(CASES):
        lf, rf = used(score, learner, reference)
        idx, stats = dense_select(lf, rf, world, selection, loss, score, seed)
        for rank, results in enumerate(per_rank):
            indices, global_indices, got = results[case]
            assert torch.equal(global_indices, idx), (selection, loss, score, rank, global_indices, idx)
            mine = idx[(idx >= rank * N_LOCAL) & (idx < (rank + 1) * N_LOCAL)] - rank * N_LOCAL
            assert torch.equal(indices, mine)  # this rank's picks, in draw order
            assert got.keys() == stats.keys()
            for key, value in stats.items():
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (selection, loss, score, key)


def test_temperature_and_repeated_draws_match_dense():
    learner, reference = global_features(1, 3)
    for temperature, seed in ((0.3, 0), (7.0, 1)):
        gen = torch.Generator().manual_seed(seed)
        dense_gen = torch.Generator().manual_seed(seed)
        for _ in range(3):  # consecutive steps from one generator: one value drawn per selection
            got = jest_select(learner, reference, B_LOCAL, n_chunks=N_CHUNKS, generator=gen, temperature=temperature)
            scores = sigmoid_pair_loss(**learner) - sigmoid_pair_loss(**reference)
            expected = joint_sample(scores, B_LOCAL, N_CHUNKS, dense_gen, temperature=temperature)
            assert torch.equal(got.indices, expected)


@pytest.mark.parametrize('loss', ('sigmoid', 'softmax') + ANCHOR_LOSSES)
def test_blockwise_conditional_equals_brute_force_gain(loss):
    learner, reference = global_features(1, 5)
    n = N_LOCAL
    scorer = conditional_scorer(learner, reference, score='learnability', loss=LOSS_SPECS.get(loss, loss), quota=6)
    if loss in ANCHOR_LOSSES:
        obj = build_objective(LOSS_SPECS.get(loss, loss))

        def value(idx):
            if not idx.numel():
                return 0.0
            return float(sum(w * obj.set_loss(obj.logits(f), idx, scale=obj.scale(f))
                             for f, w in ((learner, 1.0), (reference, -1.0))))
    elif loss == 'sigmoid':
        s = sigmoid_pair_loss(**learner) - sigmoid_pair_loss(**reference)

        def value(idx):
            return float(batch_score(s, idx))
    else:
        ll = pair_logits(learner['image_features'], learner['text_features'], learner['logit_scale'])
        lr = pair_logits(reference['image_features'], reference['text_features'], reference['logit_scale'])

        def value(idx):
            return float(softmax_set_loss(ll, idx) - softmax_set_loss(lr, idx)) if idx.numel() else 0.0

    chosen = torch.tensor([], dtype=torch.long)
    cond = scorer.initial()
    for new in (None, torch.tensor([3, 7]), torch.tensor([0]), torch.tensor([10, 2, 5])):
        if new is not None:
            cond = scorer.add(new, need_cond=True)
            chosen = torch.cat([chosen, new])
        for k in range(n):
            if k in chosen:
                continue
            gain = value(torch.cat([chosen, torch.tensor([k])])) - value(chosen)
            assert math.isclose(float(cond[k]), gain, rel_tol=1e-4, abs_tol=1e-4), (k, float(cond[k]), gain)


def test_bad_arguments_name_the_field():
    learner, reference = global_features(1, 0)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match='needs an all_gather'):
        jest_select(learner, reference, 4, generator=gen, rank=0, world_size=2)
    with pytest.raises(ValueError, match='0 <= rank < world_size'):
        jest_select(learner, reference, 4, generator=gen, rank=2, world_size=2, all_gather=lambda t: [t, t])
    with pytest.raises(ValueError, match="score='learnability' needs reference features"):
        jest_select(learner, None, 4, generator=gen)
    with pytest.raises(ValueError, match=r"selection must be one of \('joint', 'independent'\)"):
        jest_select(learner, reference, 4, selection='greedy', generator=gen)
    with pytest.raises(ValueError, match='needs learner logit_bias'):
        jest_select({**learner, 'logit_bias': None}, reference, 4, generator=gen)
    short = {**reference, 'image_features': reference['image_features'][:5],
             'text_features': reference['text_features'][:5]}
    with pytest.raises(ValueError, match='must cover the same super-batch'):
        jest_select(learner, short, 4, generator=gen)
    with pytest.raises(ValueError, match='generator must be a seeded torch.Generator'):
        jest_select(learner, reference, 4)
