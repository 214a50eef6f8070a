"""Pretrained open_clip weights through open_clip's own loading: a tag (downloaded) or a local weights file.

``pretrained`` is what ``open_clip.create_model(name, pretrained=...)`` takes: one of the model's open_clip tags
(``open_clip.list_pretrained_tags_by_model(name)``, e.g. ``'ViT-B-16-SigLIP'`` + ``'webli'``; downloaded from the
Hugging Face hub or the tag's URL, then cached) or the path of a local weights file (an open_clip ``state_dict``
as ``.pt``/``.bin``/``.pth``, ``.safetensors``, or big_vision ``.npz``). open_clip's loader converts what it knows
(third-party key layouts, a scalar ``logit_scale`` into this package's 1-element one, position-embedding sizes)
and loads strictly. A torch file is read with ``weights_only=True`` under the allowlist of
:mod:`composer_jest.models.checkpoint` (:func:`~composer_jest.models.checkpoint.read_checkpoint`): a file holding
other Python objects is refused, naming it. ``.safetensors`` and ``.npz`` hold arrays only and are read as they are.

Offline, a tag fails with an error naming it and the local-file alternative (set ``HF_HUB_OFFLINE=1`` to fail at
once rather than after the hub client's retries, ~45 s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from composer_jest.models.checkpoint import CheckpointError, read_checkpoint

__all__ = ['ARRAY_SUFFIXES', 'create_pretrained']

# Weight formats that hold arrays only (no pickle): read by open_clip directly.
ARRAY_SUFFIXES = ('.safetensors', '.npz', '.npy')


def create_pretrained(name: str, pretrained: str, field: str = 'pretrained', **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(name, pretrained=pretrained, **kwargs)`` with errors naming ``field``.

    Args:
        name: an open_clip model name.
        pretrained: one of ``name``'s open_clip tags, or a local weights file.
        field: the config field or argument ``pretrained`` came from (named in errors).

    Raises:
        ValueError: ``pretrained`` is neither a tag of ``name`` nor a file (listing the tags); the tag's download
            failed (naming the tag and how to use a local file instead); the file does not fit ``name``'s
            architecture; a :class:`~composer_jest.models.checkpoint.CheckpointError` for an unreadable or refused file.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mktemp(suffix='.pt')
        >>> torch.save(open_clip.create_model('jest-tiny').state_dict(), path)   # open_clip's own layout
        >>> clip = create_pretrained('jest-tiny', path, nonscalar_logit_scale=True)
        >>> torch.equal(clip.state_dict()['text_projection'], torch.load(path)['text_projection'])
        True
        >>> create_pretrained('jest-tiny', 'laion2b')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pretrained='laion2b' is neither a local weights file nor an open_clip tag of 'jest-tiny' (its tags: [])...
    """  # noqa: E501
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return _from_tag(name, pretrained, field, kwargs)
    if not os.path.isfile(pretrained):
        raise ValueError(f'{field}={pretrained!r} is neither a local weights file nor an open_clip tag of {name!r} '
                         f'(its tags: {tags}); open_clip.list_pretrained() lists every (model, tag) pair')

    def load(path: str) -> nn.Module:
        try:
            return open_clip.create_model(name, pretrained=path, **kwargs)
        except (RuntimeError, KeyError) as e:  # open_clip's strict load; a KeyError: a key its converters need
            if isinstance(e, RuntimeError) and 'Error(s) in loading state_dict' not in str(e):
                raise  # reading the file failed: named by read_checkpoint
            what = f'no {e} key' if isinstance(e, KeyError) else _first_lines(e)
            raise ValueError(f'{field}={path!r} does not fit the architecture {name!r}: {what}. Pass the model name '
                             'the weights were trained with (a checkpoint written by this package or Composer goes in '
                             '`checkpoint`, not `pretrained`)') from None

    if Path(pretrained).suffix.lower() in ARRAY_SUFFIXES:
        try:
            return load(pretrained)
        except ValueError:
            raise
        except Exception as e:  # safetensors' and numpy's errors for a damaged file
            raise CheckpointError(f'{pretrained}: unreadable weights file ({type(e).__name__}: {e})') from None
    return read_checkpoint(pretrained, load)


def _from_tag(name: str, tag: str, field: str, kwargs: dict) -> nn.Module:
    try:
        return open_clip.create_model(name, pretrained=tag, **kwargs)
    except RuntimeError as e:
        if 'Failed to download' not in str(e):
            raise
        raise ValueError(
            f"{field}={tag!r}: could not download open_clip's pretrained weights {tag!r} of {name!r} (offline?): "
            f'{_first_lines(e)}. Without internet, pass a local weights file instead ({field}: /path/to/weights.bin): '
            f'on a machine that is online, `open_clip.download_pretrained(open_clip.get_pretrained_cfg({name!r}, '
            f'{tag!r}))` downloads it and returns its path',
        ) from None


def _first_lines(e: BaseException, n: int = 3, width: int = 400) -> str:
    return ' '.join(str(e).strip().splitlines()[:n])[:width]
