"""Quiet by default, detail on request: what a run prints, and where the full metric stream goes.

A yaml run shows Composer's progress bar (only on a terminal: in a log file a bar is noise), prints one
:class:`EvalSummary` line per evaluation, and writes every metric of every step to a file
(``metrics_file``, Composer's ``FileLogger``). ``log_to_console: true`` adds Composer's own metric dump
every ``console_log_interval``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from composer.core import State
from composer.loggers import FileLogger, Logger, LoggerDestination
from composer.utils import dist

from composer_jest.data.progress import show_progress  # noqa: F401  (re-exported for the builders)

__all__ = ['metrics_file_logger', 'EvalSummary', 'split_eval_batch']

# JEST's per-step metrics worth a mean in the summary line (``jest/superbatch/<k>``, ``jest/selected/<k>`` too)
_JEST_MEANS = ('jest/learnability_superbatch', 'jest/learnability_selected')




def metrics_file_logger(filename: str) -> FileLogger:
    """Composer's ``FileLogger`` writing only the metric stream (``{run_name}`` and ``{rank}`` are filled in).

    It captures neither stdout nor stderr (a progress bar has no place in a file) and replaces an older file.
    """
    return FileLogger(filename, capture_stdout=False, capture_stderr=False, log_traces=False, overwrite=True)


class EvalSummary(LoggerDestination):
    """One line per evaluation (rank 0): the time, trained examples, every eval metric and JEST's selection.

    ``[eval] ba 90/150, 2880 trained: ZeroShotAccuracy 0.914, ImageToTextRecall@1 0.023 | selected clean 0.55
    (super-batch 0.25)``: the JEST figures are means over the steps since the previous evaluation.
    """

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.eval: dict[str, float] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.trained = 0

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        for key, value in metrics.items():
            if key.startswith('metrics/'):
                self.eval[key] = float(value)
            elif key == 'jest/examples_trained':
                self.trained = int(value)
            elif key in _JEST_MEANS or key.startswith(('jest/selected/', 'jest/superbatch/')):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1

    def eval_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            print(self.line(state), file=self.stream or sys.stdout, flush=True)
        self.eval.clear()
        self.sums.clear()
        self.counts.clear()

    def line(self, state: State) -> str:
        prefix = f'metrics/{state.dataloader_label}/'
        trained = self.trained or int(state.timestamp.sample)  # without JEST every streamed example is trained
        head = f'[{state.dataloader_label}] ba {int(state.timestamp.batch)}'
        if state.max_duration is not None and state.max_duration.unit.value == 'ba':
            head += f'/{state.max_duration.value}'
        parts = [f'{k[len(prefix):]} {v:.3f}' for k, v in sorted(self.eval.items()) if k.startswith(prefix)]
        line = f'{head}, {trained} trained: ' + ', '.join(parts)
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        jest = []
        for key in sorted(k for k in means if k.startswith('jest/selected/')):
            name = key[len('jest/selected/'):]
            jest.append(f'selected {name} {means[key]:.2f} '
                        f'(super-batch {means.get("jest/superbatch/" + name, float("nan")):.2f})')
        if 'jest/learnability_selected' in means:
            jest.append(f'learnability selected {means["jest/learnability_selected"]:.3f} '
                        f'(super-batch {means.get("jest/learnability_superbatch", float("nan")):.3f})')
        return line + (' | ' + ', '.join(jest) if jest else '')


def split_eval_batch(batch: Any, microbatch_size: int) -> list:
    """Split an eval batch into microbatches of ``microbatch_size``; a batch no larger is one microbatch.

    Composer's default split warns on every short batch (``Cannot split tensor of length 80 into batches of
    size 128``): the last batch of an eval set whose size is not a multiple of the batch size, every
    evaluation. Values that are not sequences (e.g. a constant) are repeated in each microbatch.

    Example:
        >>> import torch
        >>> [len(m['label']) for m in split_eval_batch({'label': torch.arange(80)}, 128)]
        [80]
        >>> [len(m['label']) for m in split_eval_batch({'label': torch.arange(80), 'k': 1}, 32)]
        [32, 32, 16]
    """
    sizes = {len(v) for v in batch.values() if hasattr(v, '__len__') and not isinstance(v, (str, bytes))}
    if len(sizes) != 1:
        raise ValueError(f'eval batch columns must have one length, got lengths {sorted(sizes)} for {sorted(batch)}')
    n = sizes.pop()
    if n <= microbatch_size:
        return [batch]
    return [{k: v[i:i + microbatch_size] if hasattr(v, '__len__') and not isinstance(v, (str, bytes)) else v
             for k, v in batch.items()} for i in range(0, n, microbatch_size)]
