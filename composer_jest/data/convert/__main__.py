"""``python -m composer_jest.data.convert ...``: the same as ``composer-jest convert ...``."""

import sys

from composer_jest.data.convert.cli import main

sys.exit(main())
