"""Callbacks that make selection auditable."""

from __future__ import annotations

import json
import os
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_jest.jest.algorithm import JEST

__all__ = ['SelectionLog']


class SelectionLog(Callback):
    """Writes, per rank and step, which examples were trained on: one JSON line per batch.

    Each line holds ``step``, ``index`` (the dataset ``index`` column of the trained batch, when
    present), ``global_indices`` (JEST's draw over the gathered super-batch in ``global`` scope, or the
    local draw) and ``loss``. Files: ``{folder}/selection-rank{rank}.jsonl``.

    Args:
        folder: output folder (created).
        index_key: batch column holding a stable example id.
    """

    def __init__(self, folder: str, index_key: str = 'index'):
        self.folder, self.index_key = folder, index_key
        self._file = None
        self._pending: Optional[dict] = None

    def fit_start(self, state: State, logger: Logger) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'selection-rank{dist.get_global_rank()}.jsonl')
        self._file = open(path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in fit_end/close)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        # Callbacks run after algorithms on each event: state.batch is already the selected sub-batch.
        jest = next((a for a in state.algorithms if isinstance(a, JEST)), None)
        record = {'step': int(state.timestamp.batch)}
        if isinstance(state.batch, dict) and self.index_key in state.batch:
            record['index'] = [int(i) for i in state.batch[self.index_key].tolist()]
        if jest is not None and getattr(jest, 'last_global_indices', None) is not None:
            record['global_indices'] = [int(i) for i in jest.last_global_indices.tolist()]
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
