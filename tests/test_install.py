"""The declared install: the torch range, the Composer pin override, requires-python and the locks agree.

``requires-python`` must be exactly what the dependency set supports: for each Python 3.9 ... 3.14 the project's
dependencies (with ``[tool.uv] override-dependencies``) are resolved with ``uv pip compile --python-version X``, wheels
only (the one sdist-only dependency, antlr4-python3-runtime, is pure Python), and the versions that resolve must be
the declared ones. These checks need uv (on PATH or ``.uv/bin/uv`` from ``.ci/setup-venv``) and PyPI; without either
they skip and say which.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())
CANDIDATE_PYTHONS = ('3.9', '3.10', '3.11', '3.12', '3.13', '3.14')
NETWORK_ERRORS = ('error sending request', 'Failed to fetch', 'dns error', 'Connect', 'timed out', 'Network')


def _overrides() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in PYPROJECT['tool']['uv']['override-dependencies'])
    return {r.name: r for r in reqs}


def _uv() -> str:
    uv = shutil.which('uv') or str(ROOT / '.uv' / 'bin' / 'uv')
    if not os.access(uv, os.X_OK):
        pytest.skip('uv is not installed: run `bash .ci/setup-venv dev` (it puts uv in .uv/bin) or put uv on PATH')
    return uv


UV_ENV = {**os.environ, 'UV_PYTHON_DOWNLOADS': 'never', 'NO_COLOR': '1'}


def _skip_if_offline(returncode: int, stderr: str) -> None:
    if returncode != 0 and any(e in stderr for e in NETWORK_ERRORS):
        pytest.skip(f'the package registry is unreachable from uv: {stderr.strip().splitlines()[-1]}')


def _run_uv(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([_uv(), *args], cwd=cwd, env=UV_ENV, capture_output=True, text=True, timeout=300)
    _skip_if_offline(proc.returncode, proc.stderr)
    return proc


@pytest.fixture(scope='module')
def compiled(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """Python version -> (returncode, stdout, stderr) of resolving the project's dependencies (+ dev, + overrides)
    for Linux x86_64 on that Python, wheels only; the six resolutions run at once."""
    uv, project, tool = _uv(), PYPROJECT['project'], PYPROJECT['tool']['uv']
    work = tmp_path_factory.mktemp('compile')
    (work / 'deps.in').write_text('\n'.join(project['dependencies'] + project['optional-dependencies']['dev']))
    (work / 'overrides.txt').write_text('\n'.join(tool['override-dependencies']))
    procs = {}
    for python in CANDIDATE_PYTHONS:
        args = [uv, 'pip', 'compile', '-q', '--no-header', '--no-annotate', '--python-version', python,
                '--python-platform', 'x86_64-manylinux_2_28', '--only-binary', ':all:',
                '--no-binary', 'antlr4-python3-runtime', '--override', 'overrides.txt', 'deps.in']
        procs[python] = subprocess.Popen(args, cwd=work, env=UV_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    results = {}
    for python, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[python] = (proc.returncode, stdout, stderr)
    return results


def _pins(compiled: str) -> dict[str, Version]:
    return {m[1].lower(): Version(m[2]) for m in re.finditer(r'^([A-Za-z0-9_.-]+)==(\S+)', compiled, re.M)}


@functools.cache
def _lock() -> dict:
    return tomllib.loads((ROOT / 'uv.lock').read_text())


def _locked(name: str) -> list[Version]:
    lock = _lock()
    return sorted(Version(p['version']) for p in lock['package'] if p['name'] == name)


@pytest.mark.parametrize('python', CANDIDATE_PYTHONS)
def test_requires_python_is_what_the_dependencies_resolve_on(python, compiled):
    declared = SpecifierSet(PYPROJECT['project']['requires-python'])
    _skip_if_offline(*compiled[python][::2])
    returncode, stdout, stderr = compiled[python]
    if python not in declared:
        assert returncode != 0, f'the dependencies resolve on Python {python}: widen requires-python ({declared})'
        return
    assert returncode == 0, f'Python {python} is declared ({declared}) but does not resolve:\n{stderr}'
    pins = _pins(stdout)
    for name, req in _overrides().items():
        assert pins[name] in req.specifier, f'{name} {pins[name]} on Python {python} is outside {req.specifier}'
        assert pins[name] in _locked(name), f'{name} {pins[name]} on Python {python} is not in uv.lock: `uv lock`'


def test_lock_matches_pyproject():
    proc = _run_uv(['lock', '--check'], ROOT)
    assert proc.returncode == 0, f'uv.lock is out of date with pyproject.toml (refresh: `uv lock`):\n{proc.stderr}'


def test_override_is_our_declared_range_and_the_oldest_set_is_its_floor():
    """One range: [tool.uv] override-dependencies = the project's own torch/torchvision requirements, and
    requirements/oldest.txt pins each at its lower bound (Composer 0.32.1's pin: torch 2.7.0)."""
    ours = {r.name: r for r in map(Requirement, PYPROJECT['project']['dependencies']) if r.name in _overrides()}
    assert {n: str(r.specifier) for n, r in ours.items()} == {n: str(r.specifier) for n, r in _overrides().items()}
    oldest = _pins((ROOT / 'requirements' / 'oldest.txt').read_text())
    for name, req in _overrides().items():
        floor = min(Version(s.version) for s in req.specifier if s.operator == '>=')
        assert oldest[name] == floor, f'requirements/oldest.txt pins {name} {oldest[name]}, the range starts at {floor}'
    assert max(_locked('torch')) > oldest['torch'], 'uv.lock should carry a newer torch than the oldest set'


def test_installed_torch_is_in_the_supported_range():
    for name, req in _overrides().items():
        installed = Version(Version(version(name)).base_version)  # drop the local tag (+cu132, +cpu)
        assert installed in req.specifier, f'{name} {installed} is installed; supported: {req.specifier}'
