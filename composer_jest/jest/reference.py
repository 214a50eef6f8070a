"""The frozen reference model JEST compares the learner against.

A reference is given as a module, a checkpoint path (a Composer checkpoint of
:class:`~composer_jest.models.clip.CLIPModel` or a plain open_clip ``state_dict``), or a dict
``{'model': name-or-config, 'checkpoint': path}``. With a bare path the architecture defaults to the
learner's, so a learner checkpoint trained with this package is directly usable as a reference.
``{'model': name, 'pretrained': tag-or-file}`` loads published weights through open_clip's own loading
(:mod:`composer_jest.models.pretrained`): an open_clip tag (downloaded when online, e.g. ``ViT-B-16-SigLIP`` +
``webli``) or a local weights file.

Checkpoints are loaded with ``weights_only=True`` (:mod:`composer_jest.models.checkpoint`): a file holding other
Python objects is refused, naming the file. :func:`preload_reference` runs at ``JEST`` construction: a
missing or non-checkpoint file fails there, and so does a checkpoint of another architecture when the
architecture is given (``{'model', 'checkpoint'}``), naming the path and the mismatched keys.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.models.clip import CLIPModel, CLIPTowers, ModelSpec, build_clip, checkpoint_state_dict

__all__ = ['ReferenceSpec', 'ReferenceScorer', 'validate_reference', 'preload_reference', 'load_reference',
           'load_weights']

ReferenceSpec = Union[nn.Module, str, os.PathLike, dict]


def validate_reference(spec: Optional[ReferenceSpec]) -> None:
    """Fail early (at construction) on a reference that cannot be loaded later."""
    if spec is None or isinstance(spec, nn.Module):
        return
    if isinstance(spec, dict):
        unknown = set(spec) - {'model', 'checkpoint', 'pretrained'}
        if unknown or 'model' not in spec:
            raise ValueError(
                f"reference dict takes keys 'model' (required) and 'checkpoint' or 'pretrained', got {sorted(spec)}",
            )
        if spec.get('checkpoint') is not None and spec.get('pretrained') is not None:
            raise ValueError("reference: give 'checkpoint' (this package's checkpoint or a state_dict) or 'pretrained' "
                             '(an open_clip tag or weights file), not both')
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
        spec: module, checkpoint path, or ``{'model', 'checkpoint'}`` / ``{'model', 'pretrained'}`` dict.
        default_model: architecture for a bare checkpoint path (normally the learner's model spec).
    """
    validate_reference(spec)
    if isinstance(spec, CLIPModel):
        towers = spec.frozen_copy()
    elif isinstance(spec, nn.Module):  # copied: freezing must never touch a module still being trained
        towers = copy.deepcopy(spec) if isinstance(spec, CLIPTowers) else CLIPTowers(copy.deepcopy(spec))
    else:
        model, path = (spec['model'], spec.get('checkpoint')) if isinstance(spec, dict) else (default_model, spec)
        if model is None:
            raise ValueError(
                'a reference checkpoint path needs an architecture: pass reference=dict(model=..., checkpoint=...)',
            )
        pretrained = spec.get('pretrained') if isinstance(spec, dict) else None
        clip = build_clip(model, pretrained, field='reference.pretrained')
        if path is not None:
            load_weights(clip, path, model)
        towers = CLIPTowers(clip)
    return towers.eval().requires_grad_(False)


def preload_reference(spec: Optional[ReferenceSpec]) -> Optional[CLIPTowers]:
    """Check a reference at construction; load it now when its architecture is known.

    A dict spec (``{'model', 'checkpoint'}`` or ``{'model', 'pretrained'}``) is loaded (so an architecture
    mismatch, an unknown tag or a failed download fails here); a bare
    checkpoint path is read once to check that it is a checkpoint that loads safely (its architecture is
    the learner's, known at fit start); a module is left for fit start. Returns the towers or ``None``.
    """
    validate_reference(spec)
    if isinstance(spec, dict):
        return load_reference(spec)
    if isinstance(spec, (str, os.PathLike)):
        checkpoint_state_dict(spec)
    return None


def load_weights(clip: nn.Module, path: Union[str, os.PathLike], model: Optional[ModelSpec] = None) -> None:
    """Load a checkpoint's weights into ``clip``; a mismatch names the file and the keys at fault."""
    state = checkpoint_state_dict(path)
    expected = clip.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}'
              for k in sorted(set(state) & set(expected))
              if getattr(state[k], 'shape', None) != expected[k].shape]
    if missing or unexpected or shapes:
        name = model if isinstance(model, str) else type(clip).__name__
        parts = [f'{label} ({len(keys)}): {keys[:5]}' + (' ...' if len(keys) > 5 else '')
                 for label, keys in (('shape mismatches', shapes), ('missing keys', missing),
                                     ('unexpected keys', unexpected)) if keys]
        raise ValueError(f'checkpoint {str(path)!r} does not fit the architecture {name!r}: ' + '; '.join(parts)
                         + '. Pass the architecture it was trained with: reference=dict(model=..., checkpoint=...)')
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f'checkpoint {str(path)!r} has NaN or inf weights in {nonfinite[:5]}'
                         + (f' and {len(nonfinite) - 5} more tensors' if len(nonfinite) > 5 else '')
                         + ': it comes from a diverged run; use an earlier checkpoint')
    clip.load_state_dict(state)


class ReferenceScorer:
    """The frozen reference's side of JEST's scoring.

    A batch that carries the cached columns (:data:`~composer_jest.core.batch.CACHED_REFERENCE_KEYS`, written by
    ``composer-jest embed-reference``) is scored from them and never runs a model (with a one-time warning when a
    live reference was given too); otherwise the live towers run, loaded at fit start when the architecture is
    the learner's, optionally held and run in bf16 end to end (logit scale and bias stay float32).

    Args:
        spec: a module, a checkpoint path, ``{'model', 'checkpoint'}``, ``{'model', 'pretrained'}``, ``'cached'`` or
            ``None`` (no reference).
    """

    def __init__(self, spec: Optional[ReferenceSpec]):
        self.spec = spec
        # Loaded now when its architecture is known: a bad file or a mismatch fails here, not at fit start.
        self.towers: Optional[CLIPTowers] = preload_reference(spec) if spec not in (None, 'cached') else None
        self.bf16 = False
        self._warned_cached = False

    def prepare(self, default_model: Optional[ModelSpec], device: torch.device, bf16: bool) -> None:
        """At fit start: load a bare checkpoint path into the learner's architecture, move, cast."""
        if self.towers is None and self.spec not in (None, 'cached'):
            self.towers = load_reference(self.spec, default_model=default_model)
        self.bf16 = bf16
        if self.towers is not None:
            self.towers.to(device)
            if bf16:
                for name, param in self.towers.named_parameters():
                    if not name.rsplit('.', 1)[-1].startswith('logit_'):
                        param.data = param.data.to(torch.bfloat16)

    def features(self, batch: dict, image: torch.Tensor, text: torch.Tensor) -> dict:
        """The reference features of the super-batch: cached columns if the batch has them, else the towers."""
        cached = self.cached(batch)
        if cached is not None:
            return cached
        if self.towers is None:
            raise RuntimeError(f"reference='cached' but the batch lacks {CACHED_REFERENCE_KEYS}; write them with "
                               '`composer-jest embed-reference`')
        if not self.bf16:
            return dict(self.towers(image, text))
        with torch.autocast(image.device.type, enabled=False):  # bf16 weights and activations throughout
            out = dict(self.towers(image.to(torch.bfloat16), text))
        return {**out, 'image_features': out['image_features'].float(),
                'text_features': out['text_features'].float()}

    def cached(self, batch: dict) -> Optional[dict]:
        """Reference features precomputed into the shards, if the batch carries them."""
        if not all(k in batch for k in CACHED_REFERENCE_KEYS):
            return None
        if self.spec != 'cached' and not self._warned_cached:
            self._warned_cached = True
            warnings.warn(
                f'the batch carries cached reference features {CACHED_REFERENCE_KEYS}: they are used instead of '
                f'the live reference {self.spec!r} (set reference: cached to say so, or train on shards '
                'without these columns to run the live reference)', UserWarning, stacklevel=3)
        image, text, scale, bias = (batch[k] for k in CACHED_REFERENCE_KEYS)
        return {
            'image_features': image.float(), 'text_features': text.float(),
            'logit_scale': scale.float().reshape(-1)[0], 'logit_bias': bias.float().reshape(-1)[0],
        }
