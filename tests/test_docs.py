"""The docstring examples are runnable: each one is executed and its printed output checked."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / 'composer_jest'
MODULES = sorted(
    '.'.join(p.relative_to(PACKAGE.parent).with_suffix('').parts)
    for p in PACKAGE.rglob('*.py') if '>>>' in p.read_text()
)


def test_the_examples_are_found():
    assert {'composer_jest.algorithm', 'composer_jest.selection', 'composer_jest.losses'} <= set(MODULES)


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
