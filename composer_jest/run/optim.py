"""Composer's ``DecoupledAdamW`` update on PyTorch's multi-tensor (``foreach``) or ``fused`` AdamW kernels.

Composer 0.32's ``DecoupledAdamW.step`` loops over the parameters in Python, a handful of kernels each plus a
``step.item()`` (a host sync on a GPU) per parameter. Its update is PyTorch's AdamW with the weight decay rescaled:

* Composer: ``θ ← θ · (1 − (η_t / η_0) · λ)``, then the Adam step ``θ ← θ − η_t · m̂ / (√v̂ + ε)``
  (``m̂, v̂`` the bias-corrected moments);
* PyTorch ``AdamW(weight_decay=λ')``: ``θ ← θ · (1 − η_t · λ')``, then the same Adam step.

So ``λ' = λ / η_0`` (``η_0`` = the learning rate the optimizer was built with, which Composer's schedulers
scale) gives the same update, and PyTorch's ``foreach`` (one kernel per op over all tensors) or ``fused`` (one
kernel for the whole update, CUDA and CPU) implementations run it.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = FusedDecoupledAdamW([w], lr=0.1, weight_decay=1e-2)
    >>> w.grad = torch.ones(3); opt.step()
    >>> [round(x, 4) for x in w.tolist()]  # 1 · (1 − 0.01) − 0.1 · 1 / (1 + 1e-8)
    [0.89, 0.89, 0.89]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Union

import torch

__all__ = ['FusedDecoupledAdamW']


class FusedDecoupledAdamW(torch.optim.AdamW):
    """``composer.optim.DecoupledAdamW`` (same arguments and defaults) on PyTorch's foreach/fused AdamW.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad: as ``DecoupledAdamW`` (``weight_decay`` is decoupled:
            every step multiplies the weights by ``1 − (lr_t / lr) · weight_decay``).
        fused: PyTorch's single-kernel AdamW (CUDA and CPU kernels; also for parameters that the Trainer moves
            to the GPU after the optimizer is built, as a yaml run does).
        foreach: PyTorch's multi-tensor AdamW when not fused (``None``: PyTorch's default, on for CUDA).

    Raises:
        ValueError: a learning rate <= 0 (the decay is relative to it), or a negative weight decay.
    """

    def __init__(
        self,
        params: Union[Iterable[torch.Tensor], Iterable[dict]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        amsgrad: bool = False,
        fused: bool = True,
        foreach: Optional[bool] = None,
    ):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{'params': groups}]
        groups = [{**g, 'params': [g['params']] if isinstance(g['params'], torch.Tensor) else list(g['params'])}
                  for g in groups]  # materialise generators (e.g. module.parameters()) once
        converted = []
        for i, group in enumerate(groups):
            group_lr = float(group.get('lr', lr))
            decay = float(group.get('weight_decay', weight_decay))
            if group_lr <= 0:
                raise ValueError(f'FusedDecoupledAdamW: lr must be > 0 (param group {i}), got {group_lr}')
            if decay < 0:
                raise ValueError(f'FusedDecoupledAdamW: weight_decay must be >= 0 (param group {i}), got {decay}')
            # PyTorch decays by lr_t · λ'; Composer by (lr_t / lr_0) · λ: λ' = λ / lr_0.
            converted.append({**group, 'weight_decay': decay / group_lr, 'decoupled_weight_decay': decay})
        super().__init__(converted, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay / lr if lr > 0 else 0.0,
                         amsgrad=amsgrad, fused=fused or None, foreach=None if fused else foreach)
        for group in self.param_groups:
            group.setdefault('initial_lr', group['lr'])
