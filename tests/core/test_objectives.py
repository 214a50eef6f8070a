"""Every registered objective: training form against a plain per-anchor formula (and open_clip where it has one),
JEST's conditional score against a brute-force ``L(C ∪ {k}) - L(C)``, and false-negative masking."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.objectives import FalseNegatives, build_objective, loss_names
from composer_jest.core.selection import joint_sample

SPECS = ['sigmoid', 'softmax', {'name': 'softmax', 'temperature': 0.2}, 'dcl', 'hcl',
         {'name': 'hcl', 'beta': 0.5, 'tau_plus': 0.0}, 'triplet', {'name': 'triplet', 'mining': 'semi-hard'}, 'npair']


def features(n: int, seed: int, scale: float = 6.0, bias: float = -3.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    y = F.normalize(x + 0.9 * torch.randn(n, 8, generator=g), dim=-1)
    return {'image_features': x, 'text_features': y, 'logit_scale': torch.tensor(scale),
            'logit_bias': torch.tensor(bias)}


def label_mask(n: int, seed: int) -> torch.Tensor:
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
    return FalseNegatives(key='label').mask(labels)


def plain_loss(spec, f: dict, mask=None) -> float:
    """The per-anchor formulas written out with Python loops (no shared code with the objectives).

    A queue in ``f`` (``queue_image_features``/``queue_text_features``/``queue_valid``) adds its valid slots to
    every anchor's negatives: queued texts for image anchors, queued images for text anchors."""
    obj = build_objective(spec)
    x, y = f['image_features'].double(), f['text_features'].double()
    n = x.shape[0]
    name = obj.name
    if name == 'triplet':
        t = 1.0
    elif getattr(obj, 'temperature', None) is not None:
        t = 1.0 / obj.temperature
    else:
        t = float(f['logit_scale'])
    sims = x @ y.T
    logits = t * sims + (float(f['logit_bias']) if name == 'sigmoid' else 0.0)
    masked = (lambda i, j: False) if mask is None else (lambda i, j: bool(mask[i, j]))
    total = 0.0
    if name == 'sigmoid':
        for i in range(n):
            for j in range(n):
                if i != j and masked(i, j):
                    continue
                z = 1.0 if i == j else -1.0
                total += -math.log(1 / (1 + math.exp(-z * float(logits[i, j]))))
        return total / n
    directions = [logits] if name == 'npair' else [logits, logits.T]
    queued = [[], []]
    if 'queue_text_features' in f:
        slots = [q for q in range(f['queue_valid'].numel()) if bool(f['queue_valid'][q])]
        qi, qt = f['queue_image_features'].double(), f['queue_text_features'].double()
        queued = [[[t * float(x[i] @ qt[q]) for q in slots] for i in range(n)],
                  [[t * float(y[i] @ qi[q]) for q in slots] for i in range(n)]]
    for d, view in enumerate(directions):
        for i in range(n):
            pos = float(view[i, i])
            negs = [float(view[i, j]) for j in range(n) if j != i and not masked(i, j)]
            negs += queued[d][i] if queued[d] else []
            if not negs:
                continue
            if name == 'softmax':
                term = -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(v) for v in negs)))
            elif name == 'npair':
                term = math.log(1 + sum(math.exp(v - pos) for v in negs))
            elif name == 'dcl':
                term = -pos + math.log(sum(math.exp(v) for v in negs))
            elif name == 'hcl':  # Robinson et al.'s reference code, in linear space
                m, beta, tau = len(negs), obj.beta, obj.tau_plus
                neg = [math.exp(v) for v in negs]
                imp = [math.exp(beta * v) for v in negs]
                reweight = sum(a * b for a, b in zip(imp, neg)) / (sum(imp) / m)
                ng = (-tau * m * math.exp(pos) + reweight) / (1 - tau)
                ng = max(ng, m * math.exp(-t))
                term = -math.log(math.exp(pos) / (math.exp(pos) + ng))
            else:  # triplet: hardest, or FaceNet/TF semi-hard (closest negative farther than the positive)
                if obj.mining == 'hardest':
                    chosen = max(negs)
                else:
                    farther = [v for v in negs if v < pos]
                    chosen = max(farther) if farther else min(negs)
                term = max(0.0, obj.margin + chosen - pos)
            total += term / len(directions)
    return total / n


@pytest.mark.parametrize('spec', SPECS, ids=str)
@pytest.mark.parametrize('masked', [False, True])
def test_training_loss_equals_the_plain_formula(spec, masked):
    f = features(10, seed=1)
    mask = label_mask(10, 2) if masked else None
    got = build_objective(spec).training_loss(f, mask)
    assert float(got) == pytest.approx(plain_loss(spec, f, mask), rel=1e-5, abs=1e-6)


def test_training_loss_equals_open_clip():
    f = features(12, seed=3)
    x, y, t, b = f['image_features'], f['text_features'], f['logit_scale'], f['logit_bias']
    assert torch.allclose(build_objective('sigmoid').training_loss(f), open_clip.loss.SigLipLoss()(x, y, t, b))
    assert torch.allclose(build_objective('softmax').training_loss(f), open_clip.loss.ClipLoss()(x, y, t))
    fixed = build_objective({'name': 'softmax', 'temperature': 0.25}).training_loss(f)
    assert torch.allclose(fixed, open_clip.loss.ClipLoss()(x, y, 4.0))
    plain_hcl = build_objective({'name': 'hcl', 'beta': 0.0, 'tau_plus': 0.0}).training_loss(f)
    assert torch.allclose(plain_hcl, open_clip.loss.ClipLoss()(x, y, t))  # β = τ⁺ = 0 is InfoNCE


@pytest.mark.parametrize('spec', SPECS, ids=str)
@pytest.mark.parametrize('masked', [False, True])
def test_conditional_score_equals_brute_force_gain(spec, masked):
    n = 14
    obj = build_objective(spec)
    learner, reference = features(n, seed=4), features(n, seed=5, scale=9.0, bias=-4.0)
    mask = label_mask(n, 6) if masked else None
    terms = [(obj.logits(f), w, obj.scale(f)) for f, w in ((learner, 1.0), (reference, -1.0))]

    def learnability(idx):
        if idx.numel() == 0:
            return 0.0
        return float(sum(w * obj.set_loss(lg, idx, mask, s) for lg, w, s in terms))

    scorer = obj.scorer(terms, mask)
    cond = scorer.initial()
    chosen = torch.tensor([], dtype=torch.long)
    for new in (None, torch.tensor([0, 5]), torch.tensor([3]), torch.tensor([11, 12, 7])):
        if new is not None:
            cond = scorer.add(new)
            chosen = torch.cat([chosen, new])
        for k in range(n):
            if k in chosen:
                continue
            brute = learnability(torch.cat([chosen, torch.tensor([k])])) - learnability(chosen)
            assert float(cond[k]) == pytest.approx(brute, rel=1e-4, abs=1e-4), (k, float(cond[k]), brute)


@pytest.mark.parametrize('spec', SPECS, ids=str)
def test_a_masked_pair_contributes_nothing(spec):
    # training loss: zero gradient at the masked logits; scores: unchanged when the masked logits change
    n = 8
    obj = build_objective(spec)
    f = features(n, seed=7)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[1, 4] = mask[4, 1] = True
    logits = obj.logits(f).requires_grad_(True)
    obj.set_loss(logits, mask=mask, scale=obj.scale(f)).backward()
    assert logits.grad[1, 4] == 0 and logits.grad[4, 1] == 0
    assert torch.count_nonzero(logits.grad) > n  # the other pairs do contribute
    if obj.name == 'sigmoid':
        unmasked = logits.grad.clone()
        logits.grad = None
        obj.set_loss(logits, scale=obj.scale(f)).backward()
        assert logits.grad[1, 4] != 0 and torch.equal(logits.grad.masked_fill(mask, 0), unmasked)

    def draws(lg):
        scorer = obj.scorer([(lg.detach(), 1.0, obj.scale(f))], mask)
        return [scorer.add(torch.tensor(c)) for c in ([1], [2], [4, 6])]

    changed = logits.detach().clone()
    changed[1, 4], changed[4, 1] = changed[1, 1] - 0.01, changed[4, 4] - 0.01  # hardest and semi-hard
    for a, b in zip(draws(logits), draws(changed)):
        assert torch.allclose(a, b)
    unmasked_scorer = obj.scorer([(changed, 1.0, obj.scale(f))])
    unmasked_scorer.add(torch.tensor([1]))
    assert not torch.allclose(unmasked_scorer.add(torch.tensor([2])), draws(changed)[1])  # it would have mattered


def test_fully_masked_anchor_has_zero_loss_and_finite_gradient():
    f = features(4, seed=8)
    mask = FalseNegatives(key='label').mask(torch.tensor([0, 0, 0, 0]))  # everything is a false negative
    for name in loss_names():
        obj = build_objective(name)
        logits = obj.logits(f).requires_grad_(True)
        loss = obj.set_loss(logits, mask=mask, scale=obj.scale(f))
        loss.backward()
        assert torch.isfinite(logits.grad).all(), name
        if obj.name != 'sigmoid':  # the sigmoid family (incl. drrho, distill in their sigmoid form) keeps positives
            assert float(loss) == 0.0, name


def test_reference_similarity_mask():
    ref = {'image_features': F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=-1),
           'text_features': F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]]), dim=-1)}
    for modality, pairs in (('image', {(0, 1)}), ('text', {(1, 2)}), ('either', {(0, 1), (1, 2)})):
        fn = FalseNegatives(threshold=0.9, modality=modality)
        mask = fn.mask(fn.signature({}, ref))
        assert {(i, j) for i, j in mask.nonzero().tolist() if i < j} == pairs, modality
        assert torch.equal(mask, mask.T)
    batch = {'ref_image_features': ref['image_features'], 'ref_text_features': ref['text_features']}
    fn = FalseNegatives(threshold=0.9)
    assert torch.equal(fn.mask(fn.signature(batch)), fn.mask(fn.signature({}, ref)))  # cached columns
    with pytest.raises(ValueError, match='needs the reference embeddings'):
        fn.signature({'label': torch.zeros(3)})


def test_joint_sampler_runs_every_objective():
    n = 24
    for name in loss_names():
        obj = build_objective(name)
        f = features(n, seed=9)
        scorer = obj.scorer([(obj.logits(f), 1.0, obj.scale(f))])
        idx = joint_sample(scorer, 8, n_chunks=4, generator=torch.Generator().manual_seed(0))
        assert idx.unique().numel() == 8


@pytest.mark.parametrize('spec, match', [
    ('hinge', r"unknown loss 'hinge'; registered losses: "
              r"\['dcl', 'distill', 'drrho', 'hcl', 'npair', 'sigmoid', 'softmax', 'triplet'\]"),
    ({'name': 'hcl', 'betta': 1.0}, r"unknown parameter\(s\) \['betta'\] of loss 'hcl'; it accepts \['beta', "),
    ({'name': 'hcl', 'tau_plus': 1.0}, r'hcl.tau_plus must be a float in \[0, 1\)'),
    ({'name': 'triplet', 'mining': 'easy'}, r"triplet.mining must be one of \('hardest', 'semi-hard'\)"),
    ({'name': 'softmax', 'temperature': 0}, 'softmax.temperature must be a float > 0'),
    ({'name': 'dcl', 'false_negatives': {'column': 'x'}}, r"unknown key\(s\) \['column'\]"),
    ({'name': 'dcl', 'false_negatives': {'threshold': 0.9, 'modality': 'audio'}}, 'modality must be one of'),
    ({'name': 'dcl', 'false_negatives': {}}, 'needs exactly one of key'),
    (3, 'must be a loss name or a dict'),
])
def test_bad_loss_specs_name_the_valid_values(spec, match):
    with pytest.raises(ValueError, match=match):
        build_objective(spec)


def test_spec_round_trips():
    spec = {'name': 'dcl', 'temperature': 0.1, 'false_negatives': {'key': 'dup_id', 'modality': 'image'}}
    assert build_objective(spec).spec() == spec
    assert build_objective(build_objective(spec).spec()).spec() == spec


# -- jest_select: every objective through the scoring core ---------------------------------------------------------

def _select(spec, mask=None, selection='joint', seed=0, **kw):
    from composer_jest.core.scoring import jest_select

    learner, reference = features(20, seed=10), features(20, seed=11, scale=9.0, bias=-4.0)
    return jest_select(learner, reference, 5, loss=spec, n_chunks=3, selection=selection, mask=mask,
                       generator=torch.Generator().manual_seed(seed), **kw), learner, reference


@pytest.mark.parametrize('spec', SPECS, ids=str)
@pytest.mark.parametrize('masked', [False, True])
def test_jest_select_draws_what_the_dense_sampler_draws(spec, masked):
    from composer_jest.core.selection import independent_sample

    mask = label_mask(20, 12) if masked else None
    obj = build_objective(spec)
    for selection in ('joint', 'independent'):
        sel, learner, reference = _select(spec, mask, selection)
        terms = [(obj.logits(f), w, obj.scale(f)) for f, w in ((learner, 1.0), (reference, -1.0))]
        gen = torch.Generator().manual_seed(0)
        if selection == 'joint':
            expected = joint_sample(obj.scorer(terms, mask), 5, 3, gen)
        else:
            per_example = sum(w * obj.per_example(lg, mask, s) for lg, w, s in terms)
            expected = independent_sample(torch.diag(per_example), 5, gen)
        assert torch.equal(sel.indices, expected), (selection, sel.indices, expected)
        selected = sum(w * obj.set_loss(lg, expected, mask, s) for lg, w, s in terms) / 5
        assert float(sel.stats['learnability_selected']) == pytest.approx(float(selected), rel=1e-5, abs=1e-5)
        if obj.name == 'sigmoid' and not masked:
            continue  # the matrix-free sigmoid path estimates the uniform figure from pairs (test_scoring.py)
        blocks = [torch.arange(5 * i, 5 * i + 5) for i in range(4)]
        uniform = sum(float(w * obj.set_loss(lg, blk, mask, s)) for lg, w, s in terms for blk in blocks) / 20
        assert float(sel.stats['learnability_superbatch']) == pytest.approx(uniform, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize('spec', ['sigmoid', 'softmax', {'name': 'softmax', 'temperature': 0.3}])
def test_matrix_free_and_dense_paths_agree(spec):
    # an all-False mask routes the blockwise losses through the dense path: same draws, same selected statistic
    blockwise = _select(spec)[0]
    dense = _select(spec, mask=torch.zeros(20, 20, dtype=torch.bool))[0]
    assert torch.equal(blockwise.indices, dense.indices)
    for key in ('learnability_selected',) + (('learnability_superbatch',) if spec != 'sigmoid' else ()):
        assert float(blockwise.stats[key]) == pytest.approx(float(dense.stats[key]), rel=1e-5, abs=1e-5)


def test_global_scope_fails_early_for_losses_it_cannot_score():
    from composer_jest.core.scoring import jest_select

    learner = features(8, seed=0)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    for spec, m, f in (('dcl', mask, learner), ('softmax', mask, learner), ('npair', None, with_queue(learner))):
        with pytest.raises(ValueError, match=r"takes every registered loss \(\['dcl', .*\]\) but without "
                                             'false_negatives or a negatives queue'):
            jest_select(f, learner, 2, loss=spec, mask=m, generator=torch.Generator().manual_seed(0),
                        rank=0, world_size=2, all_gather=lambda t: [t, t])


# -- a negatives queue -------------------------------------------------------------------------------------------

QUEUED = [s for s in SPECS if s != 'sigmoid']


def with_queue(f: dict, k: int = 6, filled: int = 4, seed: int = 20) -> dict:
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(k) < filled  # a queue still filling up: the empty slots are no negatives
    return {**f, 'queue_image_features': F.normalize(torch.randn(k, 8, generator=g), dim=-1),
            'queue_text_features': F.normalize(torch.randn(k, 8, generator=g), dim=-1), 'queue_valid': valid}


@pytest.mark.parametrize('spec', QUEUED, ids=str)
def test_queue_negatives_in_the_training_loss(spec):
    f = with_queue(features(10, seed=1))
    mask = label_mask(10, 2)
    got = build_objective(spec).training_loss(f, mask)
    assert float(got) == pytest.approx(plain_loss(spec, f, mask), rel=1e-5, abs=1e-6)
    assert float(got) != pytest.approx(plain_loss(spec, features(10, seed=1), mask), rel=1e-3)  # the queue counts


@pytest.mark.parametrize('spec', QUEUED, ids=str)
def test_queue_negatives_in_the_conditional_score(spec):
    n = 12
    obj = build_objective(spec)
    learner, reference = with_queue(features(n, seed=4)), features(n, seed=5, scale=9.0)
    terms = [(obj.logits(f), w, obj.scale(f), obj.queue_logits(f)) for f, w in ((learner, 1.0), (reference, -1.0))]
    assert terms[0][3] is not None and terms[1][3] is None

    def learnability(idx):
        return float(sum(w * obj.set_loss(lg, idx, None, s, q) for lg, w, s, q in terms)) if idx.numel() else 0.0

    scorer = obj.scorer(terms)
    cond = scorer.initial()
    assert cond.abs().sum() > 0  # with a queue a singleton has negatives
    chosen = torch.tensor([], dtype=torch.long)
    for new in (None, torch.tensor([0, 5]), torch.tensor([3, 9])):
        if new is not None:
            cond = scorer.add(new)
            chosen = torch.cat([chosen, new])
        for k in range(n):
            if k not in chosen:
                brute = learnability(torch.cat([chosen, torch.tensor([k])])) - learnability(chosen)
                assert float(cond[k]) == pytest.approx(brute, rel=1e-4, abs=1e-4), (k, float(cond[k]), brute)


def test_queue_needs_an_anchor_loss():
    with pytest.raises(ValueError, match="negatives queue needs an anchor .* not 'sigmoid'"):
        build_objective('sigmoid').training_loss(with_queue(features(4, seed=0)))
