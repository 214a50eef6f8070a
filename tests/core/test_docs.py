"""The docstring examples are runnable: each one is executed and its printed output checked."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / 'composer_jest'
MODULES = sorted(
    '.'.join(p.relative_to(PACKAGE.parent).with_suffix('').parts)
    for p in PACKAGE.rglob('*.py') if '>>>' in p.read_text()
)


def test_the_examples_are_found():
    assert {'composer_jest.jest.algorithm', 'composer_jest.core.selection', 'composer_jest.core.losses'} <= set(MODULES)


def _runs_code(example: doctest.Example) -> bool:
    return any(line.strip() and not line.strip().startswith('#') for line in example.source.splitlines())


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    examples = [e for t in doctest.DocTestFinder().find(module) for e in t.examples]
    assert any(_runs_code(e) for e in examples), f'{name}: its examples are all comments'
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
