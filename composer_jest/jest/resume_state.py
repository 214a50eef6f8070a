"""What a JEST checkpoint records so that a resume continues exactly, on any layout, and what it refuses.

Composer writes one checkpoint from rank 0 (a sharded one deduplicates replicated tensors to the lowest rank),
and every rank loads that rank's algorithm state: anything one rank keeps alone is lost on resume. So:

- **counters** are global totals (the same on every rank): ``examples_seen = sum_t N_t * W_t`` and
  ``examples_trained = sum_t b_t * W_t`` over steps ``t`` (``N`` the per-rank super-batch, ``b = round(N (1 - f))``
  the per-rank sub-batch, ``W`` the world size), so they stay right when ``W`` changes;
- the **layout**: ``world_size``, per-rank ``superbatch_size`` ``N`` and ``batch_size`` ``b``. A resume whose global
  batch ``W * b`` or filter ratio ``f`` differs is refused (it would silently change what is trained); the global
  super-batch ``W * N`` is then the same too, and it is exactly what streaming hands out (elastic resumption:
  each step's examples are the union of the old ranks' super-batches);
- **every rank's selection stream**: the state of rank ``r``'s generator (and of its two-stage augmentation
  generator), gathered from all ranks when the checkpoint is written. :func:`gather_streams` is a collective at
  ``W > 1``: it runs inside ``JEST.state_dict``, which Composer calls on every rank (``State.state_dict`` is
  collective already under FSDP).

On the same world size every rank continues its own stream: the same draws as an uninterrupted run. On another
world size (:func:`pick_stream`, one logged line): rank ``r`` continues the saved stream of rank ``r`` when the
checkpoint has one, and a rank the checkpoint had not starts its own seeded stream, as a fresh run would (in
``global`` scope every rank holds the same stream: all take rank 0's). The data of each step is the same union,
but each rank draws from its own share of it (``global`` scope: quotas per rank), so selections differ from the
old layout's from the first resumed step.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

from composer.utils import dist

log = logging.getLogger(__name__)

__all__ = ['Layout', 'ResumeState', 'Restored', 'check_layout', 'checkpoint_entries', 'gather_streams', 'pick_stream',
           'restore']


class Layout(NamedTuple):
    """One step's shape: ranks, per-rank super-batch ``N`` and per-rank sub-batch ``b``."""

    world_size: int
    superbatch_size: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def describe(self) -> str:
        return (f'{self.global_batch} ({self.world_size} rank(s) x {self.batch_size}, '
                f'super-batch {self.superbatch_size} per rank)')


class Restored(NamedTuple):
    """What :func:`restore` read from a checkpoint for this rank."""

    examples_seen: int
    examples_trained: int
    stream: Optional[dict[str, Any]]  # {'rng': generator state, 'full_res': its state} of this rank, if saved
    layout: Optional[Layout]  # the checkpoint's, if recorded


def gather_streams(stream: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``stream`` (small CPU state), indexed by rank. A collective at world size > 1."""
    if dist.get_world_size() == 1 or not dist.is_initialized():
        return [stream]
    return dist.all_gather_object(stream)


def checkpoint_entries(seen: int, trained: int, layout: Optional[Layout], stream: dict[str, Any]) -> dict[str, Any]:
    """The entries JEST's ``state_dict`` adds: global counters, the layout and all ranks' streams."""
    return {'examples_seen': seen, 'examples_trained': trained,
            'layout': None if layout is None else layout._asdict(), 'streams': gather_streams(stream)}


def restore(state: dict[str, Any], scope: str) -> Restored:
    """This rank's part of a JEST checkpoint entry. Checkpoints written before the layout was recorded held
    per-rank counters and only rank 0's stream: their counters are scaled by the current world size (as they
    were logged) and every rank gets that one stream, as before."""
    rank, world = dist.get_global_rank(), dist.get_world_size()
    saved = state.get('layout', False)
    if saved is False:  # an older checkpoint
        stream = {k: state[k] for k in ('rng', 'full_res') if k in state}
        return Restored(state.get('examples_seen', 0) * world, state.get('examples_trained', 0) * world,
                        stream or None, None)
    layout = None if saved is None else Layout(**saved)
    stream = pick_stream(state.get('streams') or [], rank, world, scope)
    return Restored(state['examples_seen'], state['examples_trained'], stream, layout)


def pick_stream(streams: list[dict[str, Any]], rank: int, world: int, scope: str) -> Optional[dict[str, Any]]:
    """Rank ``rank``'s saved stream: its own on the same world size; on another, see the module doc (and log one
    line, on rank 0). ``None``: start a fresh seeded stream."""
    if len(streams) != world and streams and rank == 0:
        log.warning('JEST: resuming a checkpoint written by %d rank(s) on %d: each step streams the same examples, '
                    'but every rank draws from its own share of them, so selections differ from the old layout\'s; '
                    '%s', len(streams), world,
                    'every rank continues the one global-scope stream' if scope == 'global' else
                    'rank r continues the saved stream of rank r where there is one, other ranks start their own '
                    'seeded stream')
    if scope == 'global':
        return streams[0] if streams else None
    return streams[rank] if rank < len(streams) else None


def check_layout(saved: Optional[Layout], now: Layout, saved_filter_ratio: Optional[float],
                 filter_ratio: float) -> None:
    """Refuse a resume whose global batch or filter ratio differs from the checkpoint's, naming both values."""
    if saved_filter_ratio is not None and float(saved_filter_ratio) != float(filter_ratio):
        raise ValueError(f'cannot resume JEST: the checkpoint was trained with filter_ratio {saved_filter_ratio}, '
                         f'this run has filter_ratio {filter_ratio}; set algorithms.jest.filter_ratio back to '
                         f'{saved_filter_ratio} (a new filter ratio changes what is trained: start a new run)')
    if saved is not None and saved.global_batch != now.global_batch:
        raise ValueError(f'cannot resume JEST: the checkpoint was trained with global batch {saved.describe()}, '
                         f'this run has global batch {now.describe()}; set global_train_batch_size back to '
                         f'{saved.global_batch} (a new batch size changes what is trained: start a new run)')


class ResumeState:
    """JEST's resume bookkeeping: the last step's :class:`Layout` (recorded in checkpoints), and a loaded
    checkpoint's layout and filter ratio until they are checked against this run's (at fit start when the loader
    has a ``batch_size``, else at the first step)."""

    def __init__(self) -> None:
        self.layout: Optional[Layout] = None
        self._pending: Optional[tuple[Optional[Layout], Optional[float]]] = None

    def entries(self, seen: int, trained: int, stream: dict[str, Any]) -> dict[str, Any]:
        """:func:`checkpoint_entries` with the last step's layout (a collective at world size > 1)."""
        return checkpoint_entries(seen, trained, self.layout, stream)

    def load(self, state: dict[str, Any], scope: str) -> Restored:
        """:func:`restore`; the checkpoint's layout and filter ratio are checked later (:meth:`fit_start`)."""
        restored = restore(state, scope)
        self._pending = (restored.layout, state.get('settings', {}).get('filter_ratio'))
        return restored

    def fit_start(self, dataloader: Any, subbatch_size: Any, filter_ratio: float) -> None:
        n = getattr(dataloader, 'batch_size', None)
        if self._pending is not None and isinstance(n, int):
            self._check(Layout(dist.get_world_size(), n, subbatch_size(n)), filter_ratio)

    def step(self, n: int, b: int, filter_ratio: float) -> None:
        """Record one step's layout (``n`` super-batch and ``b`` selected examples on this rank)."""
        self.layout = Layout(dist.get_world_size(), n, b)
        if self._pending is not None:
            self._check(self.layout, filter_ratio)

    def _check(self, now: Layout, filter_ratio: float) -> None:
        (saved, saved_filter_ratio), self._pending = self._pending, None
        check_layout(saved, now, saved_filter_ratio, filter_ratio)
