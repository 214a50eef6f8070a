"""core/steering: DRRho (softmax and sigmoid forms) and distillation against plain loops, float64, loss and gradient.

The loops follow the formulas of the module docstring term by term (one anchor, one negative at a time); the
vectorised code must match them, so a dropped reference term, a flipped sign, a sum instead of a mean over
negatives or a missing direction each fails here (and the explicit checks below name the reference term).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.objectives import build_objective, loss_names
from composer_jest.core.steering import (
    distill_sigmoid,
    distill_softmax,
    drrho_sigmoid_loss,
    drrho_softmax_loss,
)

torch.set_num_threads(1)
SHAPES = [(1, 3), (2, 4), (5, 3), (8, 6)]


def _cos(n, d, g):
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x @ y.T


def _mask(n, g):
    m = torch.rand(n, n, generator=g) < 0.25
    m = m | m.T
    return m & ~torch.eye(n, dtype=torch.bool)


def _softplus(v):
    return torch.log1p(torch.exp(-v.abs())) + v.clamp(min=0)


def loop_drrho_softmax(lg, s_ref, tau, mask=None):
    n, total = lg.shape[0], 0.0
    for view, ref in ((lg, s_ref), (lg.T, s_ref.T)):
        for i in range(n):
            terms = [(view[i, j] - view[i, i]) - (ref[i, j] - ref[i, i]) / tau
                     for j in range(n) if j != i and (mask is None or not mask[i, j])]
            if terms:
                total = total + 0.5 * tau * torch.log(sum(torch.exp(t) for t in terms) / len(terms))
    return total


def loop_drrho_sigmoid(lg, r, tau, mask=None):
    n, total = lg.shape[0], 0.0

    def pair(lg, i, j):
        return _softplus(-lg[i, j]) if i == j else _softplus(lg[i, j])

    for view, ref in ((lg, r), (lg.T, r.T)):
        for i in range(n):
            total = total + 0.5 * (pair(view, i, i) - pair(ref, i, i))
            deltas = [pair(view, i, j) - pair(ref, i, j) for j in range(n)
                      if j != i and (mask is None or not mask[i, j])]
            if deltas:
                m = len(deltas)
                total = total + 0.5 * m * tau * torch.log(sum(torch.exp(dl / tau) for dl in deltas) / m)
    return total


def loop_distill_softmax(lg, r):
    n, total = lg.shape[0], 0.0
    for view, ref in ((lg, r), (lg.T, r.T)):
        for i in range(n):
            zq = sum(torch.exp(view[i, k]) for k in range(n))
            zp = sum(torch.exp(ref[i, k]) for k in range(n))
            for j in range(n):
                p = torch.exp(ref[i, j]) / zp
                total = total + 0.5 * p * (torch.log(p) - torch.log(torch.exp(view[i, j]) / zq))
    return total


def loop_distill_sigmoid(lg, r):
    total = 0.0
    for i in range(lg.shape[0]):
        for j in range(lg.shape[0]):
            p = 1 / (1 + torch.exp(-r[i, j]))
            total = total - (p * torch.log(torch.sigmoid(lg[i, j])) + (1 - p) * torch.log(torch.sigmoid(-lg[i, j])))
    return total


def _parity(fast, slow, *args):
    a = args[0].clone().requires_grad_(True)
    b = args[0].clone().requires_grad_(True)
    out_fast, out_slow = fast(a, *args[1:]), slow(b, *args[1:])
    out_fast.backward()
    if isinstance(out_slow, torch.Tensor):  # a float 0.0 when no anchor has a negative
        out_slow.backward()
    torch.testing.assert_close(out_fast, torch.as_tensor(out_slow, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    if b.grad is not None:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    else:  # a set of one: no negatives, no gradient at all
        assert float(a.grad.abs().sum()) == 0.0


@pytest.mark.parametrize('n,d', SHAPES)
@pytest.mark.parametrize('masked', [False, True])
def test_drrho_softmax_matches_loop(n, d, masked):
    g = torch.Generator().manual_seed(n * 10 + d)
    tau = 0.1
    s, s_ref = _cos(n, d, g), _cos(n, d, g)
    mask = _mask(n, g) if masked else None
    _parity(lambda lg: drrho_softmax_loss(lg, s_ref, tau, mask), lambda lg: loop_drrho_softmax(lg, s_ref, tau, mask),
            s / tau)


@pytest.mark.parametrize('n,d', SHAPES)
@pytest.mark.parametrize('tau', [0.5, 2.0])
@pytest.mark.parametrize('masked', [False, True])
def test_drrho_sigmoid_matches_loop(n, d, tau, masked):
    g = torch.Generator().manual_seed(n * 10 + d)
    lg, r = 10 * _cos(n, d, g) - 5, 8 * _cos(n, d, g) - 4
    mask = _mask(n, g) if masked else None
    _parity(lambda lg: drrho_sigmoid_loss(lg, r, tau, mask), lambda lg: loop_drrho_sigmoid(lg, r, tau, mask), lg)


@pytest.mark.parametrize('n,d', SHAPES)
def test_distill_matches_loops(n, d):
    g = torch.Generator().manual_seed(n * 10 + d)
    lg, r = 10 * _cos(n, d, g), 12 * _cos(n, d, g) - 3
    _parity(lambda lg: distill_softmax(lg, r), lambda lg: loop_distill_softmax(lg, r), lg)
    _parity(lambda lg: distill_sigmoid(lg, r), lambda lg: loop_distill_sigmoid(lg, r), lg)


def test_reference_term_is_subtracted():
    """Learner = reference: no excess loss in either form (a dropped or sign-flipped reference term gives > 0)."""
    g = torch.Generator().manual_seed(3)
    s = _cos(6, 4, g)
    assert abs(float(drrho_softmax_loss(s / 0.1, s, 0.1))) < 1e-12
    assert abs(float(drrho_sigmoid_loss(10 * s - 5, 10 * s - 5, 1.0))) < 1e-12
    # the reference term, dropped or flipped, is not that: values differ by the reference's own loss
    dropped = drrho_softmax_loss(s / 0.1, torch.zeros_like(s), 0.1)
    assert float(dropped) > 0.1


def test_reference_steers_the_gradient():
    """A pair the reference already finds hard (high reference loss) gets less push than under plain RHO-free loss:
    raising the reference's similarity of negative (0, 1) lowers the DRO weight, hence the gradient, on l_01."""
    g = torch.Generator().manual_seed(4)
    s, s_ref = _cos(5, 4, g), _cos(5, 4, g)
    grads = []
    for bump in (0.0, 0.5):
        ref = s_ref.clone()
        ref[0, 1] += bump
        lg = (s / 0.1).requires_grad_(True)
        drrho_softmax_loss(lg, ref, 0.1).backward()
        grads.append(float(lg.grad[0, 1]))
    assert grads[1] < grads[0]  # with the sign flipped the weight, and the gradient, would grow


def test_sigmoid_form_tends_to_siglip_minus_reference():
    """τ → ∞: the DRO average becomes the plain mean, so L = SigLIP(learner) - SigLIP(reference) summed."""
    g = torch.Generator().manual_seed(5)
    lg, r = 10 * _cos(6, 4, g) - 5, 10 * _cos(6, 4, g) - 5
    eye = torch.eye(6, dtype=torch.bool)
    siglip = lambda z: torch.where(eye, F.softplus(-z), F.softplus(z)).sum()  # noqa: E731
    torch.testing.assert_close(drrho_sigmoid_loss(lg, r, 1e6), siglip(lg) - siglip(r), rtol=1e-5, atol=1e-6)
    # small τ: the worst negative dominates, the loss exceeds the plain difference
    assert float(drrho_sigmoid_loss(lg, r, 0.05)) > float(siglip(lg) - siglip(r))


def _features(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = {k: F.normalize(torch.randn(n, d, generator=g), dim=-1) for k in
         ('image_features', 'text_features', 'ref_image_features', 'ref_text_features')}
    f.update(logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0), ref_logit_scale=torch.full((n,), 8.0),
             ref_logit_bias=torch.full((n,), -4.0))
    return f


def test_objectives_from_specs_are_the_functions():
    f = _features()
    s = f['image_features'] @ f['text_features'].T
    s_ref = f['ref_image_features'] @ f['ref_text_features'].T
    r_sig, r_soft = 8 * s_ref - 4, 8 * s_ref
    cases = {
        ('drrho', 'sigmoid'): drrho_sigmoid_loss(10 * s - 5, r_sig, 1.0) + 0.5 * distill_sigmoid(10 * s - 5, r_sig),
        ('drrho', 'softmax'): drrho_softmax_loss(s / 0.07, s_ref, 0.07) + 0.5 * distill_softmax(s / 0.07, r_soft),
        ('distill', 'sigmoid'): build_objective('sigmoid').set_loss(10 * s - 5) + 0.5 * distill_sigmoid(10 * s - 5,
                                                                                                       r_sig),
        ('distill', 'softmax'): build_objective('softmax').set_loss(10 * s) + 0.5 * distill_softmax(10 * s, r_soft),
    }
    for (name, form), expected in cases.items():
        objective = build_objective({'name': name, 'form': form, 'distill': 0.5})
        torch.testing.assert_close(objective.training_loss(f), expected / 6, rtol=1e-5, atol=1e-6)
        assert objective.name == form  # JEST scores with the plain form
        assert build_objective(objective.spec()).spec() == objective.spec()


def test_registry_and_errors():
    assert {'drrho', 'distill'} <= set(loss_names())
    with pytest.raises(ValueError, match=r"drrho.form must be one of \('sigmoid', 'softmax'\)"):
        build_objective({'name': 'drrho', 'form': 'hinge'})
    with pytest.raises(ValueError, match='drrho.tau must be a float > 0'):
        build_objective({'name': 'drrho', 'tau': 0})
    with pytest.raises(ValueError, match='distill.distill must be a float >= 0'):
        build_objective({'name': 'distill', 'distill': -1})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['queue_size'\]"):
        build_objective({'name': 'drrho', 'queue_size': 3})
    f = _features()
    del f['ref_text_features']
    with pytest.raises(ValueError, match=r"lacks \['ref_text_features'\].*composer-jest embed-reference"):
        build_objective('drrho').training_loss(f)


def test_singleton_softmax_is_zero_and_sigmoid_is_the_positive():
    lg, r = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)
    assert float(drrho_softmax_loss(lg, r, 0.1)) == 0.0
    assert math.isclose(float(drrho_sigmoid_loss(lg, r, 1.0)), float(F.softplus(-lg) - F.softplus(-r)), rel_tol=1e-12)
