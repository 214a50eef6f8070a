"""Callbacks that make selection auditable."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_jest.jest.algorithm import JEST

__all__ = ['SelectionLog', 'keep_steps_before']


class SelectionLog(Callback):
    """Writes, per rank and step, which examples were trained on: one JSON line per batch.

    Each line holds ``step``, ``index`` (the dataset ``index`` column of the trained batch, when
    present), ``global_indices`` (JEST's draw over the gathered super-batch in ``global`` scope, or the
    local draw) and ``loss``. Files: ``{folder}/selection-rank{rank}.jsonl``.

    Each step is in the file once: at fit start the file keeps only the steps before the run's first step
    (``step < timestamp.batch``: those a resumed checkpoint holds; steps a killed attempt logged after its last
    checkpoint run again and are written again), and a fresh run starts an empty file. A resume on fewer ranks
    leaves the files of the ranks that no longer exist as they were.

    Args:
        folder: output folder (created).
        index_key: batch column holding a stable example id.
        superbatch: also write ``superbatch``, the ``index`` column of the whole super-batch the step drew from.
    """

    def __init__(self, folder: str, index_key: str = 'index', superbatch: bool = False):
        self.folder, self.index_key, self.superbatch = folder, index_key, superbatch
        self._file = None
        self._pending: Optional[dict] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'selection-rank{dist.get_global_rank()}.jsonl')
        keep_steps_before(path, int(state.timestamp.batch))
        self._file = open(path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in fit_end/close)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        # Callbacks run after algorithms on each event: state.batch is already the selected sub-batch.
        jest = next((a for a in state.algorithms if isinstance(a, JEST)), None)
        record = {'step': int(state.timestamp.batch)}
        if isinstance(state.batch, dict) and self.index_key in state.batch:
            record['index'] = [int(i) for i in state.batch[self.index_key].tolist()]
        if jest is not None and getattr(jest, 'last_global_indices', None) is not None:
            record['global_indices'] = [int(i) for i in jest.last_global_indices.tolist()]
        if self.superbatch and getattr(jest, 'last_superbatch_index', None) is not None:
            record['superbatch'] = [int(i) for i in torch.as_tensor(jest.last_superbatch_index).tolist()]
        self._pending = record

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._pending is None or self._file is None:
            return
        loss = state.loss
        self._pending['loss'] = float(sum(loss.values()) if isinstance(loss, dict) else loss)
        self._file.write(json.dumps(self._pending) + '\n')
        self._file.flush()
        self._pending = None

    def fit_end(self, state: State, logger: Logger) -> None:
        self.close(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def keep_steps_before(path: str, step: int) -> None:
    """Rewrite the JSON-lines log at ``path`` keeping only the records with ``record['step'] < step`` (a missing
    file stays missing). A torn last line (a process killed mid-write) is dropped."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get('step', step) < step:
                kept.append(line if line.endswith('\n') else line + '\n')
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    os.replace(tmp, path)
