"""Pass a terminal program's output through, minus its per-package list (`` + torch==2.15.0`` lines).

Used by setup-venv as ``script -qefc 'uv ...' /dev/null | python3 .ci/progress-only.py``: uv draws its progress
bars on the pseudo-terminal that ``script`` gives it, and they reach the user's terminal as they are drawn; a line
is held back only while it could still be a package-list line, and dropped when it is one.
"""

import os
import re
import sys

ANSI = re.compile(rb'\x1b\[[0-9;?]*[A-Za-z]')
LIST_LINE = re.compile(rb'^ [+\-~] \S')


def visible(pending: bytes) -> bytes:
    """The text a terminal shows for the current line: after the last carriage return, escapes removed."""
    text = ANSI.sub(b'', pending).rstrip(b'\r')
    return text.rsplit(b'\r', 1)[-1]


def could_be_list_line(text: bytes) -> bool:
    return LIST_LINE.match(text) is not None or text in (b'', b' ') or re.fullmatch(rb' [+\-~]', text) is not None


def main() -> None:
    out, pending, passing = sys.stdout.buffer, b'', False
    while chunk := os.read(0, 1 << 16):
        *lines, rest = chunk.split(b'\n')
        for line in lines:
            pending += line + b'\n'
            if passing or not LIST_LINE.match(visible(pending[:-1])):
                out.write(pending)
            pending, passing = b'', False
        pending += rest
        if pending and (passing or not could_be_list_line(visible(pending))):
            out.write(pending)
            pending, passing = b'', True
        out.flush()
    out.write(pending)
    out.flush()


if __name__ == '__main__':
    main()
