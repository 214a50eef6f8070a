"""Loading checkpoint files safely: tensors and Composer's own metadata only, never arbitrary code.

``torch.load(weights_only=False)`` runs whatever the pickle inside a file asks for, and a reference
checkpoint is exactly the file a user downloads from someone else. :func:`load_checkpoint` loads with
``weights_only=True``, allowing only the few plain types a Composer checkpoint holds besides tensors
(found by listing the globals of real checkpoints with
``torch.serialization.get_unsafe_globals_in_checkpoint``): the NumPy RNG state (an ``ndarray`` of
``uint32``), wall-clock ``timedelta`` s of the timestamp, and the ``TorchVersion`` string of the metadata.

Every failure is a :class:`CheckpointError` naming the file: refused (with the object that was refused
and how to re-save the weights of a file one trusts), not a PyTorch checkpoint at all (a text file, an
HTML error page, a truncated download), or an unreadable archive.

:func:`check_resumable` applies the same test to the checkpoint ``autoresume`` would load.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch

__all__ = ['CheckpointError', 'SAFE_GLOBALS', 'load_checkpoint', 'read_checkpoint', 'check_resumable']

T = TypeVar('T')


class CheckpointError(ValueError):
    """A checkpoint file was refused or cannot be read; the message names the file."""


def _safe_globals() -> list[Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array unpickler (numpy.core / numpy._core by version)
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct, datetime.timedelta,
            torch.torch_version.TorchVersion]


# What a Composer checkpoint of this package holds besides tensors, containers and numbers.
SAFE_GLOBALS: list[Any] = _safe_globals()


def _trust_hint(path: str) -> str:
    return ('If you trust the file and its author, re-save only its weights and use that file: '
            f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)['state']['model'], "
            f"'{path}.weights.pt')\"")


def load_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """``torch.load`` of a file with ``weights_only=True`` (plus :data:`SAFE_GLOBALS`), onto the CPU.

    Raises:
        CheckpointError: naming ``path``: missing, not a PyTorch checkpoint (or truncated), or refused because
            it holds Python objects that could run code when unpickled.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mktemp(suffix='.pt'); torch.save({'w': torch.ones(2)}, path)
        >>> load_checkpoint(path)['w']
        tensor([1., 1.])
        >>> _ = open(path, 'w').write('not a checkpoint')
        >>> load_checkpoint(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        composer_jest.models.checkpoint.CheckpointError: ...: not a PyTorch checkpoint ...
    """
    return read_checkpoint(path, lambda p: torch.load(p, map_location='cpu', weights_only=True))


def read_checkpoint(path: Union[str, os.PathLike], load: Callable[[str], T]) -> T:
    """Run ``load(path)``, a ``torch.load(weights_only=True)`` of the file (this module's, or a library's own loading
    such as open_clip's ``create_model(pretrained=path)``), under :data:`SAFE_GLOBALS` and the checks and errors
    of :func:`load_checkpoint`. Errors of ``load`` other than reading the file (``ValueError`` s) pass through.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist (or is not a file)')
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory sits at the very end
        with open(path, 'rb') as f:
            head = f.read(16)
        raise CheckpointError(
            f'{path}: not a PyTorch checkpoint (or a truncated one): torch.save writes a zip archive, this file '
            f'is not a complete one ({os.path.getsize(path)} bytes, starting {head!r})',
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return load(path)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)|got (<class [^>]+>)', str(e))
        what = next(g for g in found.groups() if g) if found else str(e).splitlines()[0][:200]
        raise CheckpointError(
            f'{path}: refused to load: it holds Python objects that could run code when unpickled ({what}). '
            'Only tensors and the plain metadata of a Composer checkpoint are loaded (weights_only=True). '
            + _trust_hint(path),
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f'{path}: unreadable checkpoint, corrupted or truncated ({type(e).__name__}: {e})') \
            from None


def check_resumable(save_folder: Optional[str], latest_filename: str = 'latest-rank{rank}.pt',
                    rank: int = 0) -> Optional[str]:
    """Make ``autoresume`` load a valid checkpoint: returns the one it will load, or ``None`` if there is none.

    Composer resumes from the ``latest`` symlink in ``save_folder`` and fails on a truncated file without
    naming it. If the latest checkpoint cannot be read, it is renamed to ``<name>.corrupt`` (kept for
    inspection), the symlink is pointed at the newest checkpoint in the folder that loads, and a warning
    names both. Only local folders with single-file checkpoints are checked (remote and sharded
    checkpoints are left to Composer).

    Raises:
        CheckpointError: the latest checkpoint is unreadable and no earlier one loads (names the file and the
            command that starts afresh).
    """
    if not save_folder or '://' in save_folder or '{' in save_folder:
        return None
    try:
        latest = Path(save_folder) / latest_filename.format(rank=rank)
    except (KeyError, IndexError):  # other placeholders ({run_name}...): left to Composer
        return None
    if not latest.is_symlink() or latest.resolve().is_dir():
        return None
    target = latest.resolve()
    try:
        _check_zip(target)
        return str(target)
    except CheckpointError as e:
        problem = str(e)
    candidates = sorted((p for p in Path(save_folder).glob('*.pt')
                         if not p.is_symlink() and p.resolve() != target), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for candidate in candidates:
        try:
            _check_zip(candidate)
        except CheckpointError:
            continue
        corrupt = target.with_name(target.name + '.corrupt')
        target.rename(corrupt)
        latest.unlink()
        latest.symlink_to(candidate.name)
        warnings.warn(f'autoresume: {problem}; moved it to {corrupt} and resuming from the previous valid '
                      f'checkpoint {candidate}', UserWarning, stacklevel=2)
        return str(candidate)
    raise CheckpointError(
        f'autoresume: {problem}, and no earlier checkpoint in {save_folder} loads; delete {latest} and {target} to '
        'start afresh',
    )


def _check_zip(path: Path) -> None:
    """Cheap structural check (no tensor data read): a complete zip archive whose members' CRCs match."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f'checkpoint {path} is truncated or not a PyTorch checkpoint (not a complete zip '
                              'archive)')
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f'checkpoint {path} is corrupted ({type(e).__name__}: {e})') from None
    if bad is not None:
        raise CheckpointError(f'checkpoint {path} is corrupted (member {bad} fails its CRC check)')
