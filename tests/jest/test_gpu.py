"""The GPU checks of ``benchmarks/gpu_check.py`` as pytest tests: ``pytest -m gpu`` on a CUDA machine.

Excluded from the default run (``-m 'not gpu'`` in pyproject). Each test is one check; the reference and the
tiny MDS sets they share are built once per session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'benchmarks'))
import gpu_check  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


@pytest.fixture(scope='session')
def context(tmp_path_factory) -> gpu_check.Context:
    return gpu_check.Context(tmp_path_factory.mktemp('gpu-check'), device='cuda')


@pytest.mark.parametrize('name', list(gpu_check.checks('cuda')))
def test_gpu_check(context, name):
    gpu_check.checks('cuda')[name](context)  # raises CheckFailed with the run's output on failure
