"""The frozen reference model JEST compares the learner against.

A reference is given as a module, a checkpoint path (a Composer checkpoint of
:class:`~composer_jest.model.CLIPModel` or a plain open_clip ``state_dict``), or a dict
``{'model': name-or-config, 'checkpoint': path}``. With a bare path the architecture defaults to the
learner's, so a learner checkpoint trained with this package is directly usable as a reference.
"""

from __future__ import annotations

import copy
import os
from typing import Optional, Union

from torch import nn

from composer_jest.model import CLIPModel, CLIPTowers, ModelSpec, build_clip, checkpoint_state_dict

__all__ = ['ReferenceSpec', 'validate_reference', 'load_reference']

ReferenceSpec = Union[nn.Module, str, os.PathLike, dict]


def validate_reference(spec: Optional[ReferenceSpec]) -> None:
    """Fail early (at construction) on a reference that cannot be loaded later."""
    if spec is None or isinstance(spec, nn.Module):
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {'model', 'checkpoint'}
        if unknown or 'model' not in spec:
            raise ValueError(
                f"reference dict takes keys 'model' (required) and 'checkpoint', got {sorted(spec)}",
            )
        path = spec.get('checkpoint')
    elif isinstance(spec, (str, os.PathLike)):
        path = spec
    else:
        raise TypeError(
            f'reference must be an nn.Module, a checkpoint path or a dict(model=..., checkpoint=...), got {type(spec)}',
        )
    if path is not None and os.path.isdir(path):
        raise ValueError(
            f'reference checkpoint {str(path)!r} is a directory (a sharded FSDP checkpoint?); the reference '
            'loads one file: save the reference run with fsdp_config.state_dict_type: full, or convert the '
            'folder with torch.distributed.checkpoint.format_utils.dcp_to_torch_save',
        )
    if path is not None and not os.path.isfile(path):
        raise ValueError(f'reference checkpoint {str(path)!r} does not exist (or is not a file)')


def load_reference(spec: ReferenceSpec, default_model: Optional[ModelSpec] = None) -> CLIPTowers:
    """Build the frozen reference towers (eval mode, no grad) from a spec.

    Args:
        spec: module, checkpoint path or ``{'model', 'checkpoint'}`` dict.
        default_model: architecture for a bare checkpoint path (normally the learner's model spec).
    """
    validate_reference(spec)
    if isinstance(spec, CLIPModel):
        towers = spec.frozen_copy()
    elif isinstance(spec, nn.Module):  # copied: freezing must never touch a module still being trained
        towers = copy.deepcopy(spec if isinstance(spec, CLIPTowers) else CLIPTowers(spec))
    else:
        model, path = (spec['model'], spec.get('checkpoint')) if isinstance(spec, dict) else (default_model, spec)
        if model is None:
            raise ValueError(
                'a reference checkpoint path needs an architecture: pass reference=dict(model=..., checkpoint=...)',
            )
        clip = build_clip(model)
        if path is not None:
            clip.load_state_dict(checkpoint_state_dict(path))
        towers = CLIPTowers(clip)
    return towers.eval().requires_grad_(False)
