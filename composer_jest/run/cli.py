"""`composer-jest` command line: each subcommand lives next to what it drives."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

# subcommand -> module with `main(argv: list[str]) -> int`
SUBCOMMANDS = {
    'train': 'composer_jest.run.train',
    'convert': 'composer_jest.data.convert',
    'embed-reference': 'composer_jest.jest.embed_reference',
    'filter': 'composer_jest.run.filter',
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in SUBCOMMANDS:
        print(f'usage: composer-jest {{{",".join(SUBCOMMANDS)}}} [args...]', file=sys.stderr)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == '__main__':
    sys.exit(main())
