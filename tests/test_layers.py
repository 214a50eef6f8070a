"""The layers hold: ``run -> jest -> data -> models -> core``, and core imports no Composer, streaming or open_clip.

The contracts are the ones in ``pyproject.toml`` (``[tool.importlinter]``), read and checked with import-linter's
own contract classes on grimp's import graph of the package, as ``lint-imports`` does. The graph is built once;
the wrong-arrow tests add one import to a copy of it and show that the same contracts then break.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract

PYPROJECT = Path(__file__).parents[1] / 'pyproject.toml'
TYPES = {'layers': LayersContract, 'forbidden': ForbiddenContract}


@pytest.fixture(scope='module')
def config() -> dict:
    return read_configuration(str(PYPROJECT))


@pytest.fixture(scope='module')
def graph(config):
    session = config['session_options']
    return grimp.build_graph(*session['root_packages'], include_external_packages=True, cache_dir=None)


def kept(config: dict, graph) -> dict[str, bool]:
    """``{contract name: kept}`` for every contract of the configuration, on (a copy of) ``graph``."""
    out = {}
    for options in config['contracts_options']:
        contract = TYPES[options['type']](name=options['name'], session_options=config['session_options'],
                                          contract_options=options)
        out[options['name']] = contract.check(copy.deepcopy(graph), verbose=False).kept
    return out


def _with_import(graph, importer: str, imported: str):
    wrong = copy.deepcopy(graph)
    wrong.add_import(importer=importer, imported=imported, line_number=1, line_contents=f'import {imported}')
    return wrong


def test_the_contracts_are_declared_and_kept(config, graph):
    types = sorted(options['type'] for options in config['contracts_options'])
    assert types == ['forbidden', 'layers']
    layers = next(o for o in config['contracts_options'] if o['type'] == 'layers')['layers']
    assert [name.rsplit('.', 1)[-1] for name in layers] == ['run', 'jest', 'data', 'models', 'core']
    assert kept(config, graph) == {options['name']: True for options in config['contracts_options']}


@pytest.mark.parametrize('importer, imported', [
    ('composer_jest.core.batch', 'composer_jest.run.builders'),  # core reaching up to run
    ('composer_jest.models.clip', 'composer_jest.jest.algorithm'),  # models reaching up to jest
    ('composer_jest.data.streaming', 'composer_jest.jest.algorithm'),  # data never imports jest
])
def test_an_upward_import_breaks_the_layers_contract(config, graph, importer, imported):
    result = kept(config, _with_import(graph, importer, imported))
    broken = [name for name, ok in result.items() if not ok]
    assert broken[:1] == ['run -> jest -> data -> models -> core']
    # core importing run also reaches Composer through it: the purity contract breaks as well
    assert len(broken) == (2 if importer.startswith('composer_jest.core') else 1)


def test_composer_in_core_breaks_the_purity_contract(config, graph):
    result = kept(config, _with_import(graph, 'composer_jest.core.step', 'composer'))
    broken = [name for name, ok in result.items() if not ok]
    assert len(broken) == 1 and broken[0].startswith('core is pure torch')
