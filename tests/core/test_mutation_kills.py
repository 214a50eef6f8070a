"""Behaviour the mutation run of ``objectives.py``, ``scoring.py``, ``blockwise.py`` and ``negatives.py`` found
unchecked (``tests/MUTATION.md``): spec round trips, argument checks, the false-negative signature from batch
columns, the selection cost model. Each test is exact against values written out by hand or a plain loop."""

from __future__ import annotations

import threading

import pytest
import test_objectives
import test_scoring
import torch
import torch.nn.functional as F

from composer_jest.core import blockwise, scoring
from composer_jest.core.losses import sigmoid_pair_loss
from composer_jest.core.negatives import FalseNegatives, Negatives
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import STAT_BLOCK, check_scope, conditional_scorer, jest_select, selection_flops
from composer_jest.core.selection import SCORE_METHODS, SCORE_TERMS, PairScorer, independent_sample, joint_sample

# -- loss specs: every parameter under its own name, nothing added ---------------------------------------------------


@pytest.mark.parametrize('spec, canonical', [
    ('softmax', 'softmax'),
    ('dcl', 'dcl'),  # no temperature: no 'temperature': None entry, a plain name
    ({'name': 'softmax'}, 'softmax'),
    ({'name': 'npair', 'temperature': 0.5}, {'name': 'npair', 'temperature': 0.5}),
    ({'name': 'hcl', 'beta': 0.5}, {'name': 'hcl', 'beta': 0.5, 'tau_plus': 0.1}),
    ({'name': 'hcl', 'tau_plus': 0.2, 'temperature': 0.1},
     {'name': 'hcl', 'beta': 1.0, 'tau_plus': 0.2, 'temperature': 0.1}),
    ('triplet', {'name': 'triplet', 'margin': 0.2, 'mining': 'hardest'}),
    ({'name': 'triplet', 'margin': 0.5, 'mining': 'semi-hard'},
     {'name': 'triplet', 'margin': 0.5, 'mining': 'semi-hard'}),
    ({'name': 'dcl', 'false_negatives': {'threshold': 0.8, 'modality': 'either'}},
     {'name': 'dcl', 'false_negatives': {'threshold': 0.8, 'modality': 'either'}}),
    ({'name': 'sigmoid', 'false_negatives': {'key': 'label'}},
     {'name': 'sigmoid', 'false_negatives': {'key': 'label', 'modality': 'image'}}),
    ({'name': 'npair', 'negatives': {'queue_size': 8}},
     {'name': 'npair', 'negatives': {'queue_size': 8, 'momentum': 0.999}}),
    ({'name': 'hcl', 'beta': 0.0, 'negatives': {'queue_size': 3, 'momentum': 0.5},
      'false_negatives': {'threshold': -0.5, 'modality': 'text'}},
     {'name': 'hcl', 'beta': 0.0, 'tau_plus': 0.1, 'false_negatives': {'threshold': -0.5, 'modality': 'text'},
      'negatives': {'queue_size': 3, 'momentum': 0.5}}),
], ids=str)
def test_spec_is_canonical_and_round_trips(spec, canonical):
    obj = build_objective(spec)
    assert obj.spec() == canonical
    again = build_objective(canonical)
    assert again.spec() == canonical
    assert again.false_negatives == obj.false_negatives and again.negatives == obj.negatives


# -- Negatives: queue_size an int >= 1, momentum in [0, 1) ------------------------------------------------------------


@pytest.mark.parametrize('queue_size, momentum', [(1, 0.0), (1, 0), (5, 0.999), (4096, 0.5)])
def test_negatives_accepts_its_range(queue_size, momentum):
    neg = Negatives(queue_size, momentum)
    assert (neg.queue_size, neg.momentum) == (queue_size, momentum)
    assert Negatives(7).momentum == 0.999


@pytest.mark.parametrize('queue_size, momentum', [
    (0, 0.5), (-3, 0.5), (True, 0.5), (2.0, 0.5), ('3', 0.5), (None, 0.5),
    (4, 1.0), (4, 1), (4, 1.5), (4, -0.1), (4, '0.5'), (4, None),
], ids=str)
def test_negatives_rejects_out_of_range(queue_size, momentum):
    with pytest.raises(ValueError, match=r'negatives\.(queue_size|momentum) must be'):
        Negatives(queue_size, momentum)


# -- FalseNegatives.signature: id columns and the reference's cached embedding columns -------------------------------


def test_key_signature_is_the_flattened_id_column():
    fn = FalseNegatives(key='label')
    sig = fn.signature({'label': [[3, 1], [3, 2]], 'other': torch.zeros(4)})
    assert sig.tolist() == [3, 1, 3, 2]
    assert fn.mask(sig).int().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert fn.signature({'label': torch.tensor([5])}).tolist() == [5]
    with pytest.raises(KeyError, match="'label' is not a batch key"):
        fn.signature({'dup_id': torch.zeros(3)})


@pytest.mark.parametrize('modality', ['image', 'text', 'either'])
def test_threshold_signature_from_the_batch_columns(modality):
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    image = torch.randn(n, d, generator=g) * 3  # unnormalised: the signature normalises each row
    text = torch.randn(n, d, generator=g).double()
    batch = {'ref_image_features': image, 'ref_text_features': text}
    fn = FalseNegatives(threshold=0.1, modality=modality)
    sig = fn.signature(batch)
    parts = {'image': [image], 'text': [text], 'either': [image, text]}[modality]
    expected = torch.cat([p.float() / p.float().norm(dim=1, keepdim=True) for p in parts], 1)
    assert sig.dtype == torch.float32
    torch.testing.assert_close(sig, expected)
    assert torch.equal(sig, fn.signature({}, {'image_features': image, 'text_features': text}))
    # the mask against a loop over pairs: above the threshold in the modality (either: in one of the two)
    cos = [[[float(F.cosine_similarity(p[i].double(), p[j].double(), dim=0)) for j in range(n)] for i in range(n)]
           for p in parts]
    want = [[i != j and any(c[i][j] > 0.1 for c in cos) for j in range(n)] for i in range(n)]
    assert fn.mask(sig).tolist() == want
    assert 0 < sum(map(sum, want)) < n * (n - 1)  # some pairs marked, not all


# -- selection_flops: the cost model written out chunk by chunk ------------------------------------------------------


def _flops_by_loop(loss: str, n: int, b: int, dim: int, n_chunks: int = 16, world_size: int = 1,
                   models: int = 2) -> int:
    """One rank's matmul FLOPs, counted per chunk (2 per multiply-add)."""
    k = min(n_chunks, b)
    sizes = [b // k + (1 if i < b % k else 0) for i in range(k)]
    per_model, chosen = 0, 0
    for t, c in enumerate(sizes):
        if loss == 'softmax' and t > 0:
            per_model += 2 * (2 * n * chosen * dim)  # l_ik and l_ki of every local row against the chosen set
        per_model += 2 * (2 * n * (c * world_size) * dim)  # l_kj and l_jk against the gathered chunk
        chosen += c * world_size
    if loss == 'softmax':
        per_model += 2 * n * b * dim  # the b-block statistic: an n x b product
    else:
        per_model += 2 * n * min(STAT_BLOCK, n) * dim  # pairs inside STAT_BLOCK-row blocks
    return models * per_model


@pytest.mark.parametrize('loss, n, b, dim, kw', [
    ('softmax', 10, 5, 3, {'n_chunks': 3, 'world_size': 2, 'models': 1}),
    ('softmax', 40, 20, 4, {}),  # defaults: 16 chunks, one rank, two models
    ('softmax', 12, 3, 2, {'n_chunks': 8}),  # more chunks than picks
    ('sigmoid', 10, 4, 3, {'world_size': 3}),
    ('sigmoid', 300, 50, 6, {'models': 1}),  # n > STAT_BLOCK
    ('sigmoid', 2560, 512, 768, {'world_size': 64}),
])
def test_selection_flops_counts_every_chunk(loss, n, b, dim, kw):
    got = selection_flops(loss, n, b, dim, **kw)
    assert isinstance(got, float)
    assert got == float(_flops_by_loop(loss, n, b, dim, **kw))


def test_selection_flops_by_hand():
    # softmax, n=10, b=5 in chunks [2, 2, 1], 2 ranks: 4·10·10·3 + 4·10·(4 + 8)·3 + 2·10·5·3
    assert selection_flops('softmax', 10, 5, 3, n_chunks=3, world_size=2, models=1) == 1200 + 1440 + 300
    # sigmoid, n=300: 2 models x (4·300·50·6 + 2·300·256·6)
    assert selection_flops('sigmoid', 300, 50, 6) == 2 * (360000 + 921600)


# -- several ranks in one process: threads whose all-gather meets at a barrier ---------------------------------------


class ThreadRanks:
    """``world`` ranks as threads; ``all_gather(rank)`` is a real collective (every rank waits for the others)."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all_gather(self, rank: int):
        def gather(t: torch.Tensor) -> list[torch.Tensor]:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out
        return gather

    def run(self, fn):
        """``[fn(rank, all_gather) for every rank]``, run concurrently; a failing rank fails the call."""
        results, errors = [None] * self.world, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.all_gather(rank))
            except BaseException as e:  # noqa: BLE001  (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


THREAD_CASES = test_scoring.CASES


@pytest.mark.parametrize('world', [3])
def test_thread_ranks_draw_the_dense_indices(world, monkeypatch):
    """``test_scoring``'s gloo check (every rank draws the dense global selection, exact statistics) on threads."""
    monkeypatch.setattr(blockwise, 'BLOCK_ELEMENTS', 3 * test_scoring.N_LOCAL)  # the multi-block paths too
    seed = 21
    learner, reference = test_scoring.global_features(world, seed)

    def rank_cases(rank, all_gather):
        out = []
        for selection, loss, score in THREAD_CASES:
            lf, rf = test_scoring.used(score, test_scoring.local(learner, rank), test_scoring.local(reference, rank))
            sel = jest_select(lf, rf, test_scoring.B_LOCAL, score=score, selection=selection,
                              loss=test_scoring.LOSS_SPECS.get(loss, loss), n_chunks=test_scoring.N_CHUNKS,
                              generator=torch.Generator().manual_seed(seed), rank=rank, world_size=world,
                              all_gather=all_gather)
            out.append((sel.indices, sel.global_indices, {k: float(v) for k, v in sel.stats.items()}))
        return out

    per_rank = ThreadRanks(world).run(rank_cases)
    n_local = test_scoring.N_LOCAL
    for case, (selection, loss, score) in enumerate(THREAD_CASES):
        lf, rf = test_scoring.used(score, learner, reference)
        idx, stats = test_scoring.dense_select(lf, rf, world, selection, loss, score, seed)
        for rank, results in enumerate(per_rank):
            indices, global_indices, got = results[case]
            assert torch.equal(global_indices, idx), (selection, loss, score, rank)
            mine = idx[(idx >= rank * n_local) & (idx < (rank + 1) * n_local)] - rank * n_local
            assert torch.equal(indices, mine), (selection, loss, score, rank)
            assert got.keys() == stats.keys()
            for key, value in stats.items():
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (selection, loss, score, rank, key)


def test_thread_ranks_outnumbering_their_items_keep_distinct_ids():
    """Five ranks of two items: every item's global id is its own (an anchor never skips another rank's item)."""
    world, n, b = 5, 2, 1
    learner, reference = (test_objectives.features(n * world, seed=s, scale=t) for s, t in ((30, 6.0), (31, 9.0)))
    obj = build_objective('dcl')

    def rows(f, rank):
        return {**f, 'image_features': f['image_features'][rank * n:(rank + 1) * n],
                'text_features': f['text_features'][rank * n:(rank + 1) * n]}

    for seed in range(4):
        def select(rank, all_gather, seed=seed):
            return jest_select(rows(learner, rank), rows(reference, rank), b, loss='dcl', n_chunks=1, rank=rank,
                               world_size=world, all_gather=all_gather, generator=torch.Generator().manual_seed(seed))

        sels = ThreadRanks(world).run(select)
        idx = sels[0].global_indices
        assert sorted(int(i) // n for i in idx) == list(range(world))  # one pick per rank
        want = float(sum(w * obj.set_loss(obj.logits(f), idx, scale=obj.scale(f))
                         for f, w in ((learner, 1.0), (reference, -1.0)))) / (b * world)
        for sel in sels:
            assert torch.equal(sel.global_indices, idx)
            assert float(sel.stats['learnability_selected']) == pytest.approx(want, rel=1e-5, abs=1e-6), seed


def test_anchor_scorer_refuses_ids_float32_cannot_hold():
    def scorer(n, world):
        return blockwise.AnchorBlocks({}, 'uniform', False, blockwise.Comm(0, world, lambda t: [t] * world), n,
                                      torch.device('cpu'), joint=True, quota=1, objective=build_objective('dcl'),
                                      scales={})

    with pytest.raises(ValueError, match='N x world_size must be < 2\\*\\*24'):
        scorer(1 << 23, 2)  # exactly 2**24 items
    assert scorer(1 << 10, 4).gid.tolist() == list(range(1 << 10))  # rank 0's ids


# -- the sigmoid scorer: single-model conditionals, the statistics-only pass, STAT_BLOCK blocks ----------------------


@pytest.mark.parametrize('loss', ['sigmoid', 'softmax', 'dcl', 'hcl', 'triplet'])
@pytest.mark.parametrize('score', ['hard_learner', 'easy_reference'])
def test_one_model_conditional_equals_brute_force_gain(loss, score):
    """One model's conditional loss (no learner - reference cancellation): exactly L(C + k) - L(C), sign by score."""
    learner, reference = test_scoring.global_features(1, 7)
    obj = build_objective(loss)
    (name, w), = test_scoring.SCORE_TERMS[score]
    f = {'learner': learner, 'reference': reference}[name]
    lf, rf = (learner, None) if name == 'learner' else (None, reference)
    scorer = conditional_scorer(lf, rf, score=score, loss=loss, quota=6)

    def value(idx):
        return w * float(obj.set_loss(obj.logits(f), idx, scale=obj.scale(f))) if idx.numel() else 0.0

    chosen, cond = torch.tensor([], dtype=torch.long), scorer.initial()
    for new in (None, torch.tensor([3, 7]), torch.tensor([0]), torch.tensor([10, 2, 5])):
        if new is not None:
            cond = scorer.add(new, need_cond=True)
            chosen = torch.cat([chosen, new])
        for k in range(test_scoring.N_LOCAL):
            if k not in chosen:
                gain = value(torch.cat([chosen, torch.tensor([k])])) - value(chosen)
                assert float(cond[k]) == pytest.approx(gain, rel=1e-4, abs=1e-4), (k, loss, score)


@pytest.mark.parametrize('loss', ['sigmoid', 'softmax', 'dcl'])
def test_statistics_only_pass_reads_only_the_chosen_rows(loss, monkeypatch):
    """The last ``add`` (``need_cond=False``) updates the chosen items' statistics: products of |C| rows, not N."""
    learner, reference = test_scoring.global_features(1, 8)
    scorer = conditional_scorer(learner, reference, score='learnability', loss=loss, quota=5, track=True)
    scorer.add(torch.tensor([4, 9]), need_cond=True)
    cond = scorer.cond.clone()
    widths = []
    real = blockwise.ScaledFeatures.logits
    monkeypatch.setattr(blockwise.ScaledFeatures, 'logits',
                        lambda self, left, right: widths.append(left.shape[0]) or real(self, left, right))
    assert scorer.add(torch.tensor([1, 12, 0]), need_cond=False) is None
    assert widths and set(widths) == {5}, widths  # |C| = 5 rows of every product, per model and direction
    assert torch.equal(scorer.cond, cond)  # the conditional scores are left alone


def test_sigmoid_superbatch_estimate_over_several_stat_blocks():
    """N > STAT_BLOCK: the uniform-batch figure pools the off-diagonal pairs of every block (counts included)."""
    n, b = STAT_BLOCK + 44, 12
    g = torch.Generator().manual_seed(3)

    def model(scale, bias):
        x = F.normalize(torch.randn(n, 4, generator=g), dim=-1)
        return {'image_features': x, 'text_features': F.normalize(x + torch.randn(n, 4, generator=g), dim=-1),
                'logit_scale': torch.tensor(scale), 'logit_bias': torch.tensor(bias)}

    learner, reference = model(8.0, -3.0), model(12.0, -5.0)
    sel = jest_select(learner, reference, b, n_chunks=3, generator=torch.Generator().manual_seed(0))
    s = (sigmoid_pair_loss(**learner) - sigmoid_pair_loss(**reference)).double()
    off, count = 0.0, 0
    for start in range(0, n, STAT_BLOCK):
        blk = slice(start, min(start + STAT_BLOCK, n))
        sub = s[blk, blk]
        off += float(sub.sum() - sub.diagonal().sum())
        count += sub.shape[0] * (sub.shape[0] - 1)
    uniform = float(s.diagonal().mean()) + (b - 1) * off / count
    selected = float(s[sel.indices][:, sel.indices].sum()) / b
    assert float(sel.stats['learnability_superbatch']) == pytest.approx(uniform, rel=1e-4)
    assert float(sel.stats['learnability_selected']) == pytest.approx(selected, rel=1e-4)


# -- compile: one compiled selection per distinct options, static shapes unless asked --------------------------------


def test_compiled_select_is_built_once_per_options_with_static_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(scoring, '_COMPILED', {})
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: calls.append((fn, kw)) or (lambda *a, **k: fn(*a, **k)))
    first = scoring._compiled_select({'backend': 'eager', 'fullgraph': True})
    assert scoring._compiled_select({'fullgraph': True, 'backend': 'eager'}) is first  # same options, any order
    other = scoring._compiled_select({'backend': 'eager', 'dynamic': True})
    assert other is not first
    assert calls == [(scoring._select, {'dynamic': False, 'backend': 'eager', 'fullgraph': True}),
                     (scoring._select, {'dynamic': True, 'backend': 'eager'})]
    assert list(scoring._COMPILED) == [repr([('backend', 'eager'), ('fullgraph', True)]),
                                       repr([('backend', 'eager'), ('dynamic', True)])]
    learner, reference = test_scoring.global_features(1, 2)
    picks = [jest_select(learner, reference, 4, n_chunks=2, compile=options,
                         generator=torch.Generator().manual_seed(5)).indices for options in (None, {'backend': 'x'})]
    assert torch.equal(picks[0], picks[1]) and calls[-1] == (scoring._select, {'dynamic': False, 'backend': 'x'})


# -- the dense path (false negatives, a negatives queue): every score, both selections, against the objective -------


@pytest.mark.parametrize('spec', ['dcl', 'hcl', {'name': 'triplet', 'mining': 'semi-hard'}], ids=str)
@pytest.mark.parametrize('score', SCORE_METHODS)
@pytest.mark.parametrize('selection', ['joint', 'independent'])
def test_dense_path_draws_what_the_objective_draws(spec, score, selection):
    """Masked, the learner carrying a queue: the draw is ``joint_sample`` of the objective's own scorer (or
    ``independent_sample`` of its per-example loss), the statistics its ``set_loss`` queue included; one b-block."""
    n, b, chunks = 10, 6, 3
    obj = build_objective(spec)
    learner = test_objectives.with_queue(test_objectives.features(n, seed=40, scale=2.0))
    reference = test_objectives.features(n, seed=41, scale=5.0)
    lf, rf = test_scoring.used(score, learner, reference)
    mask = test_objectives.label_mask(n, 42)
    sel = jest_select(lf, rf, b, loss=spec, score=score, selection=selection, n_chunks=chunks, mask=mask,
                      generator=torch.Generator().manual_seed(3))
    given = {'learner': learner, 'reference': reference}
    terms = [(obj.logits(given[k]), w, obj.scale(given[k]), obj.queue_logits(given[k])) for k, w in SCORE_TERMS[score]]
    gen = torch.Generator().manual_seed(3)
    if selection == 'joint':
        scorer = obj.scorer(terms, mask) if terms else PairScorer(torch.zeros(n, n))
        expected = joint_sample(scorer, b, chunks, gen)
    else:
        per_example = sum((w * obj.per_example(lg, mask, s, q) for lg, w, s, q in terms), torch.zeros(n))
        expected = independent_sample(torch.diag(per_example), b, gen)
    assert torch.equal(sel.indices, expected)
    if rf is None or lf is None:
        assert sel.stats == {}
        return
    stat = [(obj.logits(f), w, obj.scale(f), obj.queue_logits(f)) for f, w in ((learner, 1.0), (reference, -1.0))]

    def value(idx):
        return float(sum(w * obj.set_loss(lg, idx, mask, s, q) for lg, w, s, q in stat))

    assert float(sel.stats['learnability_selected']) == pytest.approx(value(expected) / b, rel=1e-5, abs=1e-5)
    # N // b = 1 block: the uniform figure is that block's loss / b
    assert float(sel.stats['learnability_superbatch']) == pytest.approx(value(torch.arange(b)) / b, rel=1e-5, abs=1e-5)


def test_dense_path_checks_the_models_cover_one_super_batch():
    learner, reference = test_objectives.features(10, seed=1), test_objectives.features(8, seed=2)
    with pytest.raises(ValueError, match='must cover the same super-batch'):
        jest_select(learner, reference, 4, loss='dcl', mask=torch.zeros(10, 10, dtype=torch.bool),
                    generator=torch.Generator().manual_seed(0))


# -- triplet: ties with the positive are not semi-hard; its arguments ------------------------------------------------


def test_triplet_ties_with_the_positive_are_not_semi_hard():
    """±1/2 features: every similarity is a multiple of 1/2, exact in float32, so negatives tie with positives."""
    n, spec = 10, {'name': 'triplet', 'mining': 'semi-hard', 'margin': 0.3}
    g = torch.Generator().manual_seed(5)

    def halves():
        return (torch.randint(0, 2, (n, 4), generator=g) * 2 - 1).float() / 2

    f = {'image_features': halves(), 'text_features': halves(), 'logit_scale': torch.tensor(1.0)}
    sims = f['image_features'] @ f['text_features'].T
    assert ((sims == sims.diagonal()[:, None]).sum(1) > 1).any()  # ties present
    obj = build_objective(spec)
    assert float(obj.training_loss(f)) == pytest.approx(test_objectives.plain_loss(spec, f), abs=1e-6)
    for path in ('dense', 'blockwise'):
        scorer = (obj.scorer([(obj.logits(f), 1.0, obj.scale(f))]) if path == 'dense'
                  else conditional_scorer(f, None, score='hard_learner', loss=spec, quota=8))
        chosen = torch.tensor([], dtype=torch.long)
        for new in (torch.tensor([0, 3]), torch.tensor([7]), torch.tensor([1, 9, 4])):
            cond = scorer.add(new) if path == 'dense' else scorer.add(new, need_cond=True)
            chosen = torch.cat([chosen, new])
            for k in range(n):
                if k not in chosen:
                    gain = (float(obj.set_loss(sims, torch.cat([chosen, torch.tensor([k])])))
                            - float(obj.set_loss(sims, chosen)))
                    assert float(cond[k]) == pytest.approx(gain, abs=1e-6), (path, k)


def test_triplet_takes_its_arguments():
    fn, neg = {'key': 'label'}, {'queue_size': 4, 'momentum': 0.5}
    obj = build_objective({'name': 'triplet', 'false_negatives': fn, 'negatives': neg})
    assert obj.false_negatives == FalseNegatives(key='label') and obj.negatives == Negatives(4, 0.5)
    assert obj.temperature is None and obj.margin == 0.2 and obj.mining == 'hardest'
    assert build_objective({'name': 'triplet', 'margin': 0}).margin == 0.0
    for margin in (-0.1, '0.2', None):
        with pytest.raises(ValueError, match='triplet.margin must be a float >= 0'):
            build_objective({'name': 'triplet', 'margin': margin})


# -- FalseNegatives: the threshold is a cosine in (-1, 1), strictly exceeded ----------------------------------------


def test_false_negative_threshold_range_and_strictness():
    for threshold in (-0.999, 0, 0.999):
        assert FalseNegatives(threshold=threshold).threshold == threshold
    for threshold in (-1, -1.0, 1, 1.0, 1.5, -2.5, '0.5', None, float('nan')):
        with pytest.raises(ValueError):
            FalseNegatives(threshold=threshold) if threshold is not None else FalseNegatives()
    # a pair exactly at the threshold is not marked (cosines in float32, the threshold compared as float32)
    ref = {'image_features': torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]),
           'text_features': torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
    at = float(F.normalize(torch.tensor([1.0, 1.0]), dim=0)[0])  # cos 45° as float32
    for modality, pairs in (('image', set()), ('text', set()), ('either', set())):
        fn = FalseNegatives(threshold=at, modality=modality)
        assert {tuple(p) for p in fn.mask(fn.signature({}, ref)).nonzero().tolist()} == pairs, modality
    below = FalseNegatives(threshold=at - 1e-6, modality='either')
    assert {tuple(p) for p in below.mask(below.signature({}, ref)).nonzero().tolist()} == {
        (0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)}


# -- blockwise internals with a contract: bounded row blocks, no buffer without a joint draw, one b-block ------------


def test_row_blocks_pack_consecutive_pieces_up_to_max_rows():
    pieces = [torch.arange(0, 2)[:, None], torch.arange(2, 7)[:, None], torch.arange(7, 8)[:, None],
              torch.arange(8, 9)[:, None]]
    blocks = [b.flatten().tolist() for b in blockwise._row_blocks(pieces, 3)]
    assert blocks == [[0, 1], [2, 3, 4], [5, 6, 7], [8]]  # in order, greedy, never above 3 rows
    wide = [torch.zeros(2, 5), torch.ones(1, 5)]
    assert [b.tolist() for b in blockwise._row_blocks(wide, 3)] == [[[0.0] * 5, [0.0] * 5, [1.0] * 5]]
    assert [b.shape[0] for b in blockwise._row_blocks([torch.zeros(7, 2)], 7)] == [7]


@pytest.mark.parametrize('loss', ['softmax', 'dcl'])
def test_only_a_joint_draw_keeps_the_chosen_embeddings(loss):
    learner, reference = test_scoring.global_features(1, 9)
    for joint, rows in ((True, 5), (False, 0)):
        scorer = conditional_scorer(learner, reference, loss=loss, joint=joint, quota=5)
        assert scorer.buffer.shape[:2] == (rows, 1), (joint, scorer.buffer.shape)


@pytest.mark.parametrize('loss', ['softmax', 'dcl', 'hcl'])
def test_matrix_free_statistics_with_a_single_b_block(loss):
    """N // b = 1: the uniform-batch figure is the loss of the first b items / b (no division by a clamped 2)."""
    n, b = 13, 7
    learner, reference = test_scoring.global_features(1, 10)
    sel = jest_select(learner, reference, b, loss=loss, n_chunks=3, generator=torch.Generator().manual_seed(1))
    obj = build_objective(loss)

    def value(idx):
        return float(sum(w * obj.set_loss(obj.logits(f), idx, scale=obj.scale(f))
                         for f, w in ((learner, 1.0), (reference, -1.0))))

    assert float(sel.stats['learnability_superbatch']) == pytest.approx(value(torch.arange(b)) / b, rel=1e-5)
    assert float(sel.stats['learnability_selected']) == pytest.approx(value(sel.indices) / b, rel=1e-5)
    assert n // b == 1


# -- hcl: its arguments, one negative, the floor's gradient ----------------------------------------------------------


def test_hcl_takes_its_arguments():
    obj = build_objective({'name': 'hcl', 'temperature': 0.5, 'false_negatives': {'key': 'label'},
                           'negatives': {'queue_size': 4, 'momentum': 0.5}})
    assert (obj.beta, obj.tau_plus, obj.temperature) == (1.0, 0.1, 0.5)
    assert obj.false_negatives == FalseNegatives(key='label') and obj.negatives == Negatives(4, 0.5)
    assert build_objective({'name': 'hcl', 'beta': 0}).beta == 0.0
    for beta in (-0.5, '1', None):
        with pytest.raises(ValueError, match='hcl.beta must be a float >= 0'):
            build_objective({'name': 'hcl', 'beta': beta})


@pytest.mark.parametrize('spec', ['hcl', {'name': 'hcl', 'tau_plus': 0.5, 'beta': 0.5}], ids=str)
def test_hcl_with_one_negative_and_a_dominant_positive(spec):
    """Two examples (one negative each) and aligned pairs at a high scale (τ⁺ M e^{l_ii} exceeds the reweighted
    negatives: the floor ``M e^{-t}`` applies): the plain formula, and finite gradients through the floor."""
    g = torch.Generator().manual_seed(6)
    for n, scale in ((2, 4.0), (6, 30.0)):
        x = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
        f = {'image_features': x.clone().requires_grad_(True), 'text_features': x.clone(),
             'logit_scale': torch.tensor(scale)}
        loss = build_objective(spec).training_loss(f)
        assert float(loss) == pytest.approx(test_objectives.plain_loss(spec, f), rel=1e-5, abs=1e-6), n
        loss.backward()
        assert torch.isfinite(f['image_features'].grad).all(), n


# -- conditional_scorer: its defaults and checks ---------------------------------------------------------------------


def test_conditional_scorer_defaults_and_checks():
    learner, reference = test_scoring.global_features(1, 12)
    default = conditional_scorer(learner, reference, quota=4)  # learnability, sigmoid, joint, no statistics
    explicit = conditional_scorer(learner, reference, score='learnability', loss='sigmoid', quota=4)
    assert isinstance(default, blockwise.SigmoidBlocks) and default.stat_w == {}
    # softmax has its own scorer (running normalisers, no id column in the payload); other anchor losses the generic
    assert type(conditional_scorer(learner, reference, loss='softmax', quota=4)) is blockwise.SoftmaxBlocks
    assert type(conditional_scorer(learner, reference, loss='npair', quota=4)) is blockwise.AnchorBlocks
    for scorer in (default, explicit):
        scorer.add(torch.tensor([2, 5]), need_cond=True)
    assert torch.equal(default.cond, explicit.cond)
    alone = conditional_scorer(learner, None, score='hard_learner', quota=4)  # track defaults to False
    assert alone.stat_w == {} and set(alone.models) == {'learner'}
    with pytest.raises(ValueError, match='the learnability statistics need both learner and reference'):
        conditional_scorer(learner, None, score='hard_learner', quota=4, track=True)
    with pytest.raises(ValueError, match='the learnability statistics need both learner and reference'):
        conditional_scorer(None, reference, score='easy_reference', quota=4, track=True)
    short_text = {**learner, 'text_features': learner['text_features'][:, :5]}
    with pytest.raises(ValueError, match=r'learner image_features and text_features must both be \[N, d\]'):
        conditional_scorer(short_text, None, score='hard_learner', quota=4)


@pytest.mark.parametrize('loss', ['sigmoid', 'softmax', 'dcl'])
def test_every_update_product_stays_within_block_elements(loss, monkeypatch):
    """BLOCK_ELEMENTS = N: one gathered row per product in the conditional updates and the statistics-only pass,
    whose picks are also gathered one row per collective (two simulated ranks)."""
    learner, reference = test_scoring.global_features(1, 13)
    n = test_scoring.N_LOCAL
    monkeypatch.setattr(blockwise, 'BLOCK_ELEMENTS', n)
    gathered = []
    scorer = conditional_scorer(learner, reference, loss=loss, quota=5, track=True, rank=0, world_size=2,
                                all_gather=lambda t: gathered.append(t.shape[0]) or [t, t])
    sizes = []
    real = blockwise.ScaledFeatures.logits

    def logits(self, left, right):
        sizes.append(left.shape[0] * right.shape[0])
        return real(self, left, right)

    monkeypatch.setattr(blockwise.ScaledFeatures, 'logits', logits)
    for new in (torch.tensor([0, 4]), torch.tensor([1, 11])):
        scorer.add(new, need_cond=True)
    del gathered[:]
    scorer.add(torch.tensor([3, 5, 12]), need_cond=False)  # 5 chosen rows x 1 gathered row
    assert sizes and max(sizes) <= n, sorted(set(sizes))
    assert gathered == [1, 1, 1], gathered


def test_jest_select_defaults_and_sizes():
    learner, reference = test_scoring.global_features(2, 14)  # N = 26 items of dimension 8
    draws = {c: jest_select(learner, reference, 20, generator=torch.Generator().manual_seed(2), **kw).indices
             for c, kw in (('default', {}), (16, {'n_chunks': 16}), (17, {'n_chunks': 17}))}
    assert torch.equal(draws['default'], draws[16]) and not torch.equal(draws['default'], draws[17])
    # the super-batch size is the number of rows, not the feature dimension (b = 10 > d = 8)
    assert jest_select(learner, reference, 10, n_chunks=3, generator=torch.Generator()).indices.numel() == 10
    check_scope(build_objective('dcl'), 2)  # matrix-free at any world size unless told it is masked
    with pytest.raises(ValueError, match='cannot be scored across ranks'):
        check_scope(build_objective('dcl'), 2, masked=True)


def test_unknown_negatives_keys_are_named_and_hcl_defaults_to_unit_scale():
    with pytest.raises(ValueError, match=r"negatives: unknown key\(s\) \['size'\]; valid keys"):
        build_objective({'name': 'dcl', 'negatives': {'queue_size': 3, 'size': 1}})
    f = test_objectives.features(6, seed=15)
    obj = build_objective('hcl')
    logits = obj.logits(f)
    assert torch.equal(obj.set_loss(logits), obj.set_loss(logits, scale=torch.tensor(1.0)))  # no scale: t = 1
    with pytest.raises(ValueError, match=r"^loss: unknown loss 'hinge'"):  # errors name the field, 'loss' by default
        build_objective('hinge')
