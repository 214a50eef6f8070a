"""Whether to draw a progress bar: shared by every long command (train, convert, embed-reference, filter)."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ['show_progress']

def show_progress(setting: Optional[bool], stream: TextIO = sys.stderr) -> bool:
    """A progress bar's on/off: ``setting`` when given, else on only when ``stream`` is a terminal.

    Example:
        >>> import io
        >>> show_progress(None, io.StringIO()), show_progress(True, io.StringIO())
        (False, True)
    """
    if setting is not None:
        return bool(setting)
    isatty = getattr(stream, 'isatty', None)
    return bool(isatty and isatty())
