"""The embedded default run: a reference, then uniform and JEST side by side, and what JEST bought.

``python -m composer_jest.train`` with no yaml runs three recipes on the procedural shapes set (CPU, a few
minutes): ``quickstart_reference`` (a tiny model on clean pairs), then ``quickstart_uniform`` and
``quickstart`` (JEST, f = 0.75, scored against that reference) on the same noisy pool (3 captions in 4
describe another image) for the same number of *trained* examples (``max_duration`` in batches of the same
size). It ends with a table (zero-shot accuracy, examples seen/trained, clean fraction of what was streamed
and of what was trained on, wall time) and one PNG: the learning curves of both learners against examples
trained on, and the pairwise learnability of one super-batch (scored with the JEST learner of its first
evaluation), rows and columns ordered by JEST's selection.

Example:
    >>> from composer_jest.run.quickstart import RunResult, comparison_table
    >>> r = RunResult('uniform', [(3200, 0.2), (6400, 0.31)], 6400, 6400, 0.25, 0.25, 12.0)
    >>> print(comparison_table([r]).splitlines()[2])
    uniform        0.310      6400      6400       0.25       0.25      12
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from composer_jest.core.contract import scoring_model
from composer_jest.core.losses import sigmoid_pair_loss
from composer_jest.core.step import select_step
from composer_jest.jest.algorithm import JEST
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import RECIPES, load_config

__all__ = ['STAGES', 'RunResult', 'run_stage', 'comparison_table', 'learnability_matrix', 'plot', 'run_comparison']

#: (name, recipe in :data:`~composer_jest.run.config.RECIPES`) in the order they run; the JEST recipe reads the
#: reference checkpoint the first one writes
STAGES = (('reference', 'quickstart_reference.yaml'), ('uniform', 'quickstart_uniform.yaml'),
          ('jest', 'quickstart.yaml'))
ZERO_SHOT = 'metrics/eval/ZeroShotAccuracy'
CLEAN = 'clean'  # the pool's flag: 1 when the caption describes its own image


@dataclass
class RunResult:
    """What one run of the comparison produced."""

    name: str
    curve: list[tuple[int, float]]  # (examples trained so far, zero-shot accuracy) at every evaluation
    examples_seen: int  # streamed (the super-batches for JEST)
    examples_trained: int
    clean_seen: float  # fraction of the streamed examples whose caption is their own
    clean_trained: float  # ... of the trained examples
    wall_s: float

    @property
    def zero_shot(self) -> float:
        return self.curve[-1][1] if self.curve else float('nan')


class _History(LoggerDestination):
    """Counts what a run streamed and trained on (and how much of it was clean), and its zero-shot curve.

    The trained batch is read at ``AFTER_DATALOADER``: callbacks run after algorithms there, so under JEST it is
    already the selected sub-batch; JEST's own ``jest/examples_seen`` and ``jest/superbatch/clean`` give the
    super-batches (without JEST, seen = trained).
    """

    def __init__(self):
        self.zero_shot: list[tuple[int, float]] = []
        self.trained = 0
        self.clean_trained = 0.0
        self.seen: Optional[int] = None
        self.clean_seen: list[float] = []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        self.trained += len(batch['image']) * dist.get_world_size()
        if CLEAN in batch:
            self.clean_trained += float(torch.as_tensor(batch[CLEAN]).float().sum()) * dist.get_world_size()

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if ZERO_SHOT in metrics:
            self.zero_shot.append((self.trained, float(metrics[ZERO_SHOT])))
        if 'jest/examples_seen' in metrics:
            self.seen = int(metrics['jest/examples_seen'])
        if f'jest/superbatch/{CLEAN}' in metrics:
            self.clean_seen.append(float(metrics[f'jest/superbatch/{CLEAN}']))

    def result(self, name: str, wall_s: float) -> RunResult:
        clean_trained = self.clean_trained / max(self.trained, 1)
        clean_seen = sum(self.clean_seen) / len(self.clean_seen) if self.clean_seen else clean_trained
        return RunResult(name, self.zero_shot, self.seen if self.seen is not None else self.trained, self.trained,
                         clean_seen, clean_trained, wall_s)


class _LearnerAtFirstEval(LoggerDestination):
    """A copy of the learner at its first evaluation: the heatmap shows what JEST scores while it learns (at the
    end, learner and reference agree on the clean pairs and the matrix is nearly flat there)."""

    def __init__(self):
        self.model = None

    def eval_start(self, state: State, logger: Logger) -> None:
        if self.model is None:
            self.model = copy.deepcopy(state.model)


def run_stage(name: str, yaml: Path, overrides: Sequence[str] = (), extra: Sequence[LoggerDestination] = ()):
    """Train one recipe (``extra`` callbacks ride along); return its :class:`RunResult` and the closed trainer."""
    cfg = load_config(yaml, list(overrides))
    history = _History()
    start = time.perf_counter()
    trainer = build_trainer(cfg, extra_loggers=[history, *extra])
    trainer.fit()
    wall = time.perf_counter() - start
    trainer.close()
    return history.result(name, wall), trainer


def comparison_table(results: Sequence[RunResult]) -> str:
    """A fixed-width table of the runs."""
    head = (f'{"run":<10}{"zero-shot":>10}{"seen":>10}{"trained":>10}{"clean seen":>11}{"clean trnd":>11}'
            f'{"wall s":>8}')
    rows = [f'{r.name:<10}{r.zero_shot:>10.3f}{r.examples_seen:>10}{r.examples_trained:>10}'
            f'{r.clean_seen:>11.2f}{r.clean_trained:>11.2f}{r.wall_s:>8.0f}' for r in results]
    return '\n'.join([head, '-' * len(head), *rows])


def learnability_matrix(trainer, learner: Optional[torch.nn.Module] = None,
                        seed: int = 0) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Pair learnability ``S_ij = ℓ_learner(i, j) - ℓ_reference(i, j)`` of one super-batch, ordered by selection.

    The super-batch is the first of the trainer's train loader, scored by ``learner`` (default: the trained one;
    through the scoring contract) and JEST's reference with the per-pair sigmoid loss; the order is a JEST draw
    with JEST's settings. Returns ``(S, b, clean)``: the first ``b`` rows/columns are the selected sub-batch (in
    draw order), then the rest; ``clean`` holds the batch's clean flags in the same order.
    """
    jest = next(a for a in trainer.state.algorithms if isinstance(a, JEST))
    batch = next(iter(trainer.state.train_dataloader))
    model = scoring_model(learner if learner is not None else trainer.state.model)
    with torch.no_grad():
        learner = model.score_features(batch)
        reference = jest.reference(batch['image'], batch['text'])
    n = batch['image'].shape[0]
    settings = dataclasses.replace(jest.config, loss='sigmoid', scope='local', compile=None)
    step = select_step(batch, settings, torch.Generator().manual_seed(seed), learner=learner, reference=reference)
    picked, b = step.global_indices, step.indices.numel()  # one rank: positions, in draw order
    rest = torch.ones(n, dtype=torch.bool)
    rest[picked] = False
    order = torch.cat([picked, rest.nonzero().flatten()])
    scores = sigmoid_pair_loss(**learner) - sigmoid_pair_loss(**reference)
    return scores[order][:, order], b, torch.as_tensor(batch[CLEAN])[order]


def plot(results: Sequence[RunResult], scores: torch.Tensor, b: int, clean: torch.Tensor, path: Path,
         scored_at: Optional[int] = None) -> Path:
    """Learning curves of the learners (left) and the ordered learnability matrix (right) in one PNG."""
    import matplotlib  # noqa: PLC0415  (plotting only here)

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in results:
        if r.name == 'reference':
            left.axhline(r.zero_shot, color='grey', ls=':', label=f'reference (clean data): {r.zero_shot:.2f}')
        elif r.curve:
            left.plot(*zip(*r.curve), marker='o', label=f'{r.name}: {r.zero_shot:.2f}')
    left.set(xlabel='examples trained on', ylabel='zero-shot accuracy', ylim=(0, 1.02),
             title='same pool, same trained examples')
    left.legend(loc='lower right')
    limit = float(scores.abs().quantile(0.99))
    image = right.imshow(scores.numpy(), cmap='RdBu_r', vmin=-limit, vmax=limit)
    mismatched = (~clean.bool()).nonzero().flatten().numpy()
    right.scatter([-2.5] * len(mismatched), mismatched, marker='_', s=12, color='k', clip_on=False)
    right.axhline(b - 0.5, color='k', lw=0.8)
    right.axvline(b - 0.5, color='k', lw=0.8)
    when = f'learner at {scored_at} trained; ' if scored_at is not None else ''
    right.set(title=f'learnability (learner − reference loss), one super-batch\n{when}first {b} = selected; '
                    f'ticks: mismatched', xlabel='caption j', ylabel='image i')
    fig.colorbar(image, ax=right, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_comparison(overrides: Sequence[str] = (), out: Path = Path('runs/quickstart')) -> list[RunResult]:
    """Reference, then uniform and JEST (``overrides`` apply to each); print the table, write ``out/quickstart.png``.

    Runs torch on one thread unless ``OMP_NUM_THREADS`` says otherwise: for this tiny model a second thread buys
    little, and next to any other busy process it costs several times the wall time (measured here: the whole
    comparison in 1.5 CPU-minutes on one thread vs > 5.5 on two, on a shared 2-core machine).
    """
    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(1)
    results, trainer, snapshot = [], None, _LearnerAtFirstEval()
    for name, yaml in STAGES:
        print(f'== {name} ({yaml}) ==', flush=True)
        result, trainer = run_stage(name, RECIPES / yaml, overrides, extra=[snapshot] if name == 'jest' else [])
        results.append(result)
    scores, b, clean = learnability_matrix(trainer, snapshot.model)
    scored_at = results[-1].curve[0][0] if snapshot.model is not None and results[-1].curve else None
    png = plot(results, scores, b, clean, out / 'quickstart.png', scored_at)
    print(f'\n== JEST vs uniform on the same noisy pool, same number of trained examples ==\n'
          f'{comparison_table(results)}\ncurves and the learnability matrix: {png}\n', flush=True)
    return results
