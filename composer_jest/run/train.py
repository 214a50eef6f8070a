"""Yaml-driven training: ``python -m composer_jest.train [run.yaml ...] [key=value ...]``.

Also ``composer -n N -m composer_jest.train run.yaml`` for N processes, and ``composer-jest train``.
Several yamls run in order (a recipe: e.g. a reference run, then the JEST run that uses its
checkpoint); overrides apply to each. With no yaml the embedded quickstart comparison runs
(:mod:`composer_jest.run.quickstart`): a tiny reference on clean shapes, then a uniform and a JEST learner on
the same noisy shapes for the same number of trained examples, on the CPU in a few minutes; it ends
with a table and ``runs/quickstart/quickstart.png``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional

from composer.loggers import LoggerDestination
from composer.utils import dist

from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config


class MetricsSummary(LoggerDestination):
    """Keeps the last value and the running mean of every scalar metric, for the end-of-run table."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            self.last[key] = value
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key]

    def table(self) -> str:
        rows = [(k, self.last[k]) for k in sorted(self.last) if k.startswith('metrics/eval/')]
        rows += [(k, self.last[k]) for k in ('jest/examples_seen', 'jest/examples_trained') if k in self.last]
        rows += [(f'{k} (mean)', self.mean(k)) for k in sorted(self.last)
                 if k.startswith('jest/') and k not in ('jest/examples_seen', 'jest/examples_trained')]
        rows += [(k, self.last[k]) for k in ('loss/train/total',) if k in self.last]
        width = max((len(k) for k, _ in rows), default=10)
        return '\n'.join(f'{k:<{width}}  {_fmt(v)}' for k, v in rows)


def _fmt(v: float) -> str:
    """Integers as integers, anything else (NaN and inf included) with 4 decimals."""
    return str(int(v)) if math.isfinite(v) and v == int(v) else f'{v:.4f}'


def run(path: Optional[str | Path], overrides: list[str]) -> MetricsSummary:
    cfg = load_config(path, overrides)
    summary = MetricsSummary()
    trainer = build_trainer(cfg, extra_loggers=[summary])
    trainer.fit()
    trainer.close()
    if cfg.print_metrics and dist.get_global_rank() == 0:
        name = cfg.run_name or Path(path or 'defaults').stem
        print(f'\n== {name}: final metrics ==\n{summary.table()}\n', flush=True)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__)
        return 0
    paths = [a for a in argv if '=' not in a]
    overrides = [a for a in argv if '=' in a]
    if not paths:
        from composer_jest.run.quickstart import run_comparison  # noqa: PLC0415

        run_comparison(overrides)
        return 0
    for path in paths:
        run(path, overrides)
    return 0


if __name__ == '__main__':
    sys.exit(main())
