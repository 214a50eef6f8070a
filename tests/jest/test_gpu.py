"""The GPU checks of ``benchmarks/gpu_check.py``, run as users run them: ``pytest -m gpu`` on a CUDA machine.

Excluded from the default run (``-m 'not gpu'`` in pyproject). The script runs every check in one scratch folder
(the reference and the tiny MDS sets they share are built once) and prints one ``PASS``/``FAIL`` line per check;
this test fails with the ``FAIL`` lines (each names its check and the tail of the failed run's output).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / 'benchmarks' / 'gpu_check.py'

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


def test_gpu_checks(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cuda', '--workdir', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    summary = re.search(r'^(\d+) passed, (\d+) failed$', proc.stdout, re.MULTILINE)
    assert summary is not None, f'gpu_check.py exited {proc.returncode} without a summary:\n{out[-6000:]}'
    failures = [block for block in re.split(r'^(?=PASS |FAIL )', proc.stdout, flags=re.MULTILINE)
                if block.startswith('FAIL ')]
    assert not failures and proc.returncode == 0, '\n'.join(failures) or out[-6000:]
    passed = int(summary.group(1))
    assert passed == len(re.findall(r'^PASS ', proc.stdout, re.MULTILINE)) and passed >= 5, proc.stdout
