"""Quiet by default, detail on request: what a run prints, and where the full metric stream goes.

A yaml run shows Composer's progress bar (only on a terminal: in a log file a bar is noise), prints one
:class:`EvalSummary` line per evaluation, and writes every metric of every step to a file
(``metrics_file``, Composer's ``FileLogger``). ``log_to_console: true`` adds Composer's own metric dump
every ``console_log_interval``.

The metrics file survives ``autoresume`` (:class:`MetricsFileLogger`): a resumed run keeps the history its
checkpoint holds and appends to it, so each step is in the file once.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Optional, TextIO

from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import FileLogger, Logger, LoggerDestination
from composer.utils import dist

from composer_jest.data.progress import show_progress  # noqa: F401  (re-exported for the builders)

__all__ = ['metrics_file_logger', 'MetricsFileLogger', 'EvalSummary', 'split_eval_batch']

# JEST's per-step metrics worth a mean in the summary line (``jest/superbatch/<k>``, ``jest/selected/<k>`` too)
_JEST_MEANS = ('jest/learnability_superbatch', 'jest/learnability_selected')




def metrics_file_logger(filename: str) -> FileLogger:
    """The metric stream's file logger (``{run_name}`` and ``{rank}`` are filled in): a :class:`MetricsFileLogger`.

    It captures neither stdout nor stderr (a progress bar has no place in a file). A fresh run replaces an older
    file; a resumed run continues it.
    """
    return MetricsFileLogger(filename)


_CHECKPOINT_MARK = '[checkpoint]: batch='
_METRIC_BATCH = re.compile(rb'^\[metric\]\[batch=(\d+)\]')


class MetricsFileLogger(FileLogger):
    """Composer's ``FileLogger`` for the metric stream, continued across ``autoresume`` / ``load_path``.

    Composer's ``FileLogger`` opens its file with ``w+`` at ``Event.INIT`` (``overwrite=False`` does not stop it in
    Composer 0.32.1: the flag is stored as a one-element tuple, always true), so a resumed run erased the history.
    Here the file is opened for appending, and after each checkpoint this logger writes a line
    ``[checkpoint]: batch=K``. At fit start, with the run at batch ``K`` (0 for a fresh run):

    - ``K = 0``: the older content is dropped (a new run replaces the file, as before);
    - ``K > 0``: the older content is kept up to its last ``[checkpoint]: batch=K`` line (what the loaded checkpoint
      had logged: steps ``0 … K-1``, the evaluation and epoch end at ``K``); the lines a killed attempt wrote after
      that checkpoint are dropped, since the resumed run logs those steps again. A file without that line (the
      checkpoint came from another run's folder) keeps its ``[metric][batch=k]`` lines with ``k < K``. A line
      ``[resume]: batch=K`` marks where the resumed attempt starts.
    """

    def __init__(self, filename: str):
        super().__init__(filename, capture_stdout=False, capture_stderr=False, log_traces=False, overwrite=True)
        self._attempt_start: Optional[int] = None  # byte offset where this process's lines begin
        self._marked: Optional[int] = None

    def init(self, state: State, logger: Logger) -> None:
        self._is_newline = True
        self._run_name = state.run_name
        if self.file is not None:
            raise RuntimeError('The file logger is already initialized')
        os.makedirs(os.path.dirname(self.filename) or '.', exist_ok=True)
        self.file = open(self.filename, 'a', buffering=self.buffer_size)  # noqa: SIM115 (closed by FileLogger)
        self._attempt_start = self.file.tell()
        self._flush_queue()

    def fit_start(self, state: State, logger: Logger) -> None:
        if self._attempt_start is None or self.file is None:
            return  # a second fit() in this process continues the file as it is
        self._flush_queue()
        self.file.close()
        batch = int(state.timestamp.batch)
        with open(self.filename, 'rb') as f:
            text = f.read()
        old, new = text[:self._attempt_start], text[self._attempt_start:]
        kept = history_until(old, batch) if batch > 0 else b''
        resume = f'[resume]: batch={batch}\n'.encode() if batch > 0 else b''
        with open(f'{self.filename}.tmp', 'wb') as f:
            f.write(kept + resume + new)
        os.replace(f'{self.filename}.tmp', self.filename)
        self.file = open(self.filename, 'a', buffering=self.buffer_size)  # noqa: SIM115
        self._attempt_start = None

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._mark_checkpoint(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._mark_checkpoint(state)

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._mark_checkpoint(state)

    def _mark_checkpoint(self, state: State) -> None:
        """Loggers run after the other callbacks on an event: a checkpoint saved at this event is on disk now."""
        batch = int(state.timestamp.batch)
        saved = any(getattr(cb, 'last_checkpoint_batch', None) == state.timestamp.batch for cb in state.callbacks
                    if isinstance(cb, CheckpointSaver))
        if saved and self._marked != batch:
            self.write('', f'{_CHECKPOINT_MARK}{batch}\n')
            self._marked = batch


def history_until(text: bytes, batch: int) -> bytes:
    """The part of a metrics file's ``text`` that a checkpoint at ``batch`` holds (see :class:`MetricsFileLogger`)."""
    lines = text.splitlines(keepends=True)
    mark = f'{_CHECKPOINT_MARK}{batch}'.encode()
    ends = [i for i, line in enumerate(lines) if line.rstrip(b'\r\n') == mark]
    if ends:
        return b''.join(lines[:ends[-1] + 1])
    kept = []
    for line in lines:
        match = _METRIC_BATCH.match(line)
        if (match is None or int(match.group(1)) < batch) and line.endswith(b'\n'):
            kept.append(line)
    return b''.join(kept)


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
