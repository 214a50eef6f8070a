"""The reference in the training loss: DRRho model steering and reference distillation (pure torch).

Notation: a trained batch of ``n`` pairs, learner cosines ``s_ij = x_i·y_j`` and logits ``l_ij`` (image ``i``,
text ``j``), the reference's cosines ``s'_ij`` and logits ``r_ij = t' s'_ij (+ b')`` from the cached columns
``ref_image_features``, ``ref_text_features``, ``ref_logit_scale``, ``ref_logit_bias`` (written by
``composer-jest embed-reference``). ``N_i`` are anchor ``i``'s negatives (``j ≠ i``, false negatives removed).
Both directions are used (text anchors read the columns), each with weight ``½``; the training loss is
``L(B) / n``.

**DRRho** (Wei et al. 2025, "Model Steering", arXiv 2505.06699): the loss of a pair is the learner's minus the
reference's (RHO), and the negatives of each anchor are weighted distributionally robustly: with a KL penalty of
temperature ``τ`` towards uniform weights, ``max_p Σ_j p_j d_j - τ KL(p || 1/|N_i|) = τ log (1/|N_i|) Σ_j e^{d_j/τ}``.

* softmax form (DRRho-CLIP; its fixed-temperature version): the pair loss of anchor ``i`` and negative ``j`` is
  ``ℓ_ij = s_ij - s_ii`` and ``l = s / τ``, so with ``d_ij = (l_ij - l_ii) - (s'_ij - s'_ii) / τ``
  ``F_i = τ log (1/|N_i|) Σ_{j∈N_i} exp(d_ij)`` (0 with no negatives; the reference's cosines at the learner's
  ``τ``, as in the paper). The learner's learned scale is unused (``τ`` is the temperature of both).
* sigmoid form (SigLIP): pair losses ``ℓ_ij = softplus(-z_ij l_ij)``, ``ℓ'_ij = softplus(-z_ij r_ij)``
  (``z_ii = 1``, ``z_ij = -1``; the reference at its own ``t', b'``), ``δ_ij = ℓ_ij - ℓ'_ij`` and
  ``F_i = δ_ii + |N_i| τ log (1/|N_i|) Σ_{j∈N_i} exp(δ_ij / τ)``. As ``τ → ∞`` the batch loss tends to
  ``Σ_{ij} δ_ij``: SigLIP's loss minus the reference's.

``L_DRRho(B) = Σ_i ½ (F_i^image + F_i^text)``.

**Distillation** (weight ``λ``, added to the loss of either family): match the learner's pairwise similarity
distribution on the trained batch to the reference's.

* softmax: ``D = Σ_i ½ (KL(q'_i || q_i) + KL(q'^T_i || q^T_i))`` with ``q_i = softmax_j l_ij`` and
  ``q'_i = softmax_j r_ij`` (``q^T``: over the column, text → image);
* sigmoid: ``D = Σ_{ij} BCE(σ(r_ij), l_ij) = Σ_{ij} softplus(l_ij) - σ(r_ij) l_ij`` (per-pair targets).

Registered losses (``model.loss``; JEST scores a model trained with them by the plain form's loss, its ``name``):

* ``{name: drrho, form: sigmoid | softmax, tau: τ, distill: λ}``: ``(L_DRRho + λ D) / n``;
* ``{name: distill, form: sigmoid | softmax, distill: λ}``: ``(L_form + λ D) / n`` (SigLIP / CLIP plus distillation).

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    >>> s = x @ x.T
    >>> float(drrho_softmax_loss(s / 0.1, s, tau=0.1).abs())  # the learner equals the reference: no excess loss
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, Features
from composer_jest.core.negatives import false_negatives_spec as _false_negatives
from composer_jest.core.objectives import LOSS_REGISTRY, Objective, Sigmoid, Softmax

__all__ = ['FORMS', 'drrho_softmax_loss', 'drrho_sigmoid_loss', 'distill_softmax', 'distill_sigmoid',
           'reference_logits', 'check_reference_columns', 'DRRhoSoftmax', 'DRRhoSigmoid', 'DistillSoftmax',
           'DistillSigmoid', 'drrho', 'distill']

FORMS = ('sigmoid', 'softmax')
DEFAULT_TAU = {'softmax': 0.07, 'sigmoid': 1.0}


def _negatives(n: int, mask: Optional[torch.Tensor], device) -> torch.Tensor:
    valid = ~torch.eye(n, dtype=torch.bool, device=device)
    return valid if mask is None else valid & ~mask.to(device)


def _log_mean_exp(d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log (1/|N_i|) Σ_{j∈N_i} e^{d_ij}`` per row, 0 for a row with no valid entry."""
    count = valid.sum(1)
    lse = d.masked_fill(~valid, -math.inf).logsumexp(1) - count.clamp(min=1).to(d.dtype).log()
    return torch.where(count > 0, lse, torch.zeros_like(lse))


def drrho_softmax_loss(logits: torch.Tensor, ref_cos: torch.Tensor, tau: float,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``L_DRRho(B)`` of the softmax form (module docstring) from learner logits ``l = s / τ`` and the reference's
    cosines ``s'`` (both ``[n, n]``); summed over anchors."""
    r = ref_cos.to(logits.dtype) / tau
    valid = _negatives(logits.shape[0], mask, logits.device)
    total = logits.new_zeros(())
    for lg, rf, ok in ((logits, r, valid), (logits.T, r.T, valid.T)):
        d = (lg - torch.diagonal(lg)[:, None]) - (rf - torch.diagonal(rf)[:, None])
        total = total + 0.5 * tau * _log_mean_exp(d, ok).sum()
    return total


def _sigmoid_pair_loss(logits: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return torch.where(eye, F.softplus(-logits), F.softplus(logits))


def drrho_sigmoid_loss(logits: torch.Tensor, ref_logits: torch.Tensor, tau: float,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``L_DRRho(B)`` of the sigmoid form (module docstring) from learner and reference logits ``[n, n]``."""
    delta = _sigmoid_pair_loss(logits) - _sigmoid_pair_loss(ref_logits.to(logits.dtype))
    valid = _negatives(logits.shape[0], mask, logits.device)
    total = torch.diagonal(delta).sum()  # ½ per direction, two directions
    for dl, ok in ((delta, valid), (delta.T, valid.T)):
        count = ok.sum(1).to(dl.dtype)
        total = total + 0.5 * (count * tau * _log_mean_exp(dl / tau, ok)).sum()
    return total


def distill_softmax(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``D`` of the softmax form: ``Σ_i ½ (KL(q'_i || q_i) + KL(q'^T_i || q^T_i))``, summed over anchors."""
    ref_logits = ref_logits.to(logits.dtype)
    total = logits.new_zeros(())
    for lg, rf in ((logits, ref_logits), (logits.T, ref_logits.T)):
        target = rf.log_softmax(1)
        total = total + 0.5 * (target.exp() * (target - lg.log_softmax(1))).sum()
    return total


def distill_sigmoid(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``D`` of the sigmoid form: ``Σ_ij softplus(l_ij) - σ(r_ij) l_ij`` (BCE against the reference's probabilities)."""
    return (F.softplus(logits) - torch.sigmoid(ref_logits.to(logits.dtype)) * logits).sum()


def check_reference_columns(batch: Mapping[str, Any], loss: str) -> None:
    """Raise ``ValueError`` naming the missing cached reference columns and how to write them."""
    missing = [k for k in CACHED_REFERENCE_KEYS if k not in batch]
    if missing:
        raise ValueError(f'loss {loss!r} reads the reference from the batch columns {list(CACHED_REFERENCE_KEYS)}, '
                         f'but the batch lacks {missing} (it has {sorted(batch)}). Write them into the shards with '
                         '`composer-jest embed-reference` and train on those shards.')


def reference_logits(features: Features, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s', r)``: the reference's cosines and its own logits ``t' s' (+ b' for sigmoid)``, float32."""
    image, text = (features[k].float() for k in CACHED_REFERENCE_KEYS[:2])
    cos = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    scale = torch.as_tensor(features[CACHED_REFERENCE_KEYS[2]], device=cos.device).float().reshape(-1)[0]
    logits = scale * cos
    if form == 'sigmoid':
        logits = logits + torch.as_tensor(features[CACHED_REFERENCE_KEYS[3]], device=cos.device).float().reshape(-1)[0]
    return cos, logits


class _Steered:
    """Mixin of the steered losses: ``training_loss`` reads the reference columns; JEST scores with the base form."""

    reference_keys = CACHED_REFERENCE_KEYS
    form: str
    family: str
    weight: float

    def spec(self) -> Any:
        p = dict(self.params())
        if self.false_negatives is not None:
            fn = self.false_negatives
            p['false_negatives'] = {k: v for k, v in (('key', fn.key), ('threshold', fn.threshold),
                                                      ('modality', fn.modality)) if v is not None}
        return {'name': self.family, **p}

    def steered_loss(self, logits: torch.Tensor, ref_cos: torch.Tensor, ref_logits: torch.Tensor,
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, features: Features, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_reference_columns(features, self.family)
        logits = self.logits(features)
        ref_cos, ref_logits = reference_logits(features, self.form)
        loss = self.steered_loss(logits, ref_cos, ref_logits, mask)
        if self.weight > 0:
            kd = distill_sigmoid if self.form == 'sigmoid' else distill_softmax
            loss = loss + self.weight * kd(logits, ref_logits)
        return loss / logits.shape[0]


def _check_weight(weight: Any, family: str) -> float:
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and weight >= 0):
        raise ValueError(f'{family}.distill must be a float >= 0 (the distillation weight λ), got {weight!r}')
    return float(weight)


class DRRhoSoftmax(_Steered, Softmax):
    """DRRho, softmax form (module docstring), plus ``λ D``; fixed temperature ``τ``."""

    family = 'drrho'
    form = 'softmax'

    def __init__(self, tau: float = DEFAULT_TAU['softmax'], distill: float = 0.0,
                 false_negatives: Optional[Mapping] = None):
        super().__init__(temperature=tau, false_negatives=false_negatives)
        self.tau, self.weight = float(tau), _check_weight(distill, 'drrho')

    def params(self) -> dict[str, Any]:
        return {'form': self.form, 'tau': self.tau, 'distill': self.weight}

    def steered_loss(self, logits, ref_cos, ref_logits, mask):
        return drrho_softmax_loss(logits, ref_cos, self.tau, mask)


class DRRhoSigmoid(_Steered, Sigmoid):
    """DRRho, sigmoid form (module docstring), plus ``λ D``; the learner's scale and bias, DRO temperature ``τ``."""

    family = 'drrho'
    form = 'sigmoid'

    def __init__(self, tau: float = DEFAULT_TAU['sigmoid'], distill: float = 0.0,
                 false_negatives: Optional[Mapping] = None):
        super().__init__(false_negatives=false_negatives)
        if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f'drrho.tau must be a float > 0, got {tau!r}')
        self.tau, self.weight = float(tau), _check_weight(distill, 'drrho')

    def params(self) -> dict[str, Any]:
        return {'form': self.form, 'tau': self.tau, 'distill': self.weight}

    def steered_loss(self, logits, ref_cos, ref_logits, mask):
        return drrho_sigmoid_loss(logits, ref_logits, self.tau, mask)


class DistillSoftmax(_Steered, Softmax):
    """CLIP's loss plus ``λ D`` (softmax distillation); the learner's scale, or a fixed ``temperature``."""

    family = 'distill'
    form = 'softmax'

    def __init__(self, distill: float = 1.0, temperature: Optional[float] = None,
                 false_negatives: Optional[Mapping] = None):
        super().__init__(temperature=temperature, false_negatives=false_negatives)
        self.weight = _check_weight(distill, 'distill')

    def params(self) -> dict[str, Any]:
        return {'form': self.form, 'distill': self.weight, **Softmax.params(self)}

    def steered_loss(self, logits, ref_cos, ref_logits, mask):
        return self.set_loss(logits, mask=mask)


class DistillSigmoid(_Steered, Sigmoid):
    """SigLIP's loss plus ``λ D`` (per-pair sigmoid targets)."""

    family = 'distill'
    form = 'sigmoid'

    def __init__(self, distill: float = 1.0, false_negatives: Optional[Mapping] = None):
        super().__init__(false_negatives=false_negatives)
        self.weight = _check_weight(distill, 'distill')

    def params(self) -> dict[str, Any]:
        return {'form': self.form, 'distill': self.weight}

    def steered_loss(self, logits, ref_cos, ref_logits, mask):
        return self.set_loss(logits, mask=mask)


def _form(form: Any, family: str) -> str:
    if form not in FORMS:
        raise ValueError(f'{family}.form must be one of {FORMS}, got {form!r}')
    return form


def drrho(form: str = 'sigmoid', tau: Optional[float] = None, distill: float = 0.0,
          false_negatives: Optional[Mapping] = None) -> Objective:
    """The ``drrho`` loss spec: ``form`` sigmoid | softmax, DRO temperature ``tau`` (default 1.0 for sigmoid, in
    pair-loss nats; 0.07 for softmax, the logit temperature too), distillation weight ``distill`` (λ, default 0)."""
    cls = DRRhoSigmoid if _form(form, 'drrho') == 'sigmoid' else DRRhoSoftmax
    tau = DEFAULT_TAU[form] if tau is None else tau
    if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f'drrho.tau must be a float > 0, got {tau!r}')
    return cls(tau=tau, distill=distill, false_negatives=_false_negatives(false_negatives))


def distill(form: str = 'sigmoid', distill: float = 1.0, temperature: Optional[float] = None,
            false_negatives: Optional[Mapping] = None) -> Objective:
    """The ``distill`` loss spec: SigLIP (``form: sigmoid``) or CLIP (``softmax``, learned scale unless
    ``temperature``) plus ``distill`` (λ) times the distillation term."""
    if _form(form, 'distill') == 'sigmoid':
        if temperature is not None:
            raise ValueError('distill.temperature applies to form: softmax only (SigLIP learns its scale and bias)')
        return DistillSigmoid(distill=distill, false_negatives=_false_negatives(false_negatives))
    return DistillSoftmax(distill=distill, temperature=temperature, false_negatives=_false_negatives(false_negatives))


LOSS_REGISTRY.register('drrho', func=drrho)
LOSS_REGISTRY.register('distill', func=distill)
