"""Step cost of JEST vs uniform training, side by side in one process, with analytic FLOP ratios beside.

Every configuration runs real Composer training steps (``Trainer.fit``) on pre-made in-memory batches, so the
measured step includes JEST's ``AFTER_DATALOADER`` work (learner/reference scoring, the joint sampler, the
sub-batch gather) as well as forward, backward and the optimizer step. A callback times each step from
``BEFORE_DATALOADER`` to ``BATCH_END`` (the "dataloader" is a list holding one ready batch, so fetching costs
nothing) and splits it into selection (``BEFORE_DATALOADER`` → ``AFTER_DATALOADER``, callbacks run after
algorithms), forward + loss, backward, and the rest (optimizer step, Composer bookkeeping).

Configurations (``b`` = trained batch size, ``N = b / (1 - f)`` = super-batch):

* ``uniform``: no selection, batch ``b``; ``uniform+multires``: the same with half the batch at 2x patch.
* ``jest``: learnability scores, learner scored at full resolution, live reference forward.
* ``+flexi``: the learner scores the super-batch at twice the native patch size (FlexiViT).
* ``+cached``: reference features precomputed once and carried in the batch (``CACHED_REFERENCE_KEYS``).
* ``+multires``: half of every trained batch encoded at twice the native patch size.

Then the joint sampler alone (``joint_sample`` on a random ``N x N`` matrix, ``n_select = 0.2 N``, 16 chunks)
and ``jest_select`` (blockwise scores of both models + sampler + statistics) for several ``N``.

Examples::

    python benchmarks/step_cost.py --device cpu --model jest-tiny --batch-size 64
    python benchmarks/step_cost.py --device cuda --model jest-vit-b-16 --precision amp_bf16 --batch-size 256
    python benchmarks/step_cost.py --quick --profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from composer_jest.algorithm import CACHED_REFERENCE_KEYS, JEST
from composer_jest.flops import step_flops
from composer_jest.model import CLIPModel
from composer_jest.scoring import jest_select
from composer_jest.selection import joint_sample


@dataclass
class Config:
    """One benchmarked training setup."""

    name: str
    filter_ratio: Optional[float]  # None: uniform (no JEST)
    flexi: bool = False
    cached: bool = False
    multires: bool = False


@dataclass
class Result:
    """Per-step timings (milliseconds) of one configuration."""

    config: Config
    superbatch: int
    subbatch: int
    step_ms: list[float]
    select_ms: list[float]
    forward_ms: list[float]
    backward_ms: list[float]
    flops: dict[str, float]
    flops_image_only: dict[str, float]

    @property
    def median(self) -> float:
        return statistics.median(self.step_ms)


class StepTimer(Callback):
    """Wall-clock time of each training step and of its phases; synchronises CUDA at every mark."""

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []
        self._current: dict[str, float] = {}

    def _mark(self, state: State, key: str) -> None:
        if state.device.name == 'gpu':
            torch.cuda.synchronize()
        self._current[key] = time.perf_counter()

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_DATALOADER:
            self._current = {}
            self._mark(state, 'start')
        elif event == Event.AFTER_DATALOADER:  # callbacks run after algorithms: JEST has selected by now
            self._mark(state, 'selected')
        elif event in (Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.AFTER_BACKWARD):
            self._mark(state, event.value)
        elif event == Event.BATCH_END:
            self._mark(state, 'end')
            self.marks.append(self._current)


class OneBatchLoader(torch.utils.data.Dataset):
    """``length`` items that are all the same ready-made batch (``DataLoader(batch_size=None)`` yields it as is)."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


def make_batch(clip: torch.nn.Module, n: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random images and token ids shaped for ``clip`` (timing does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    size = clip.visual.image_size
    image = torch.randn(n, 3, size[0], size[1], generator=gen)
    vocab = clip.token_embedding.num_embeddings
    text = torch.randint(1, vocab - 1, (n, clip.context_length), generator=gen)
    text[:, -1] = vocab - 1  # an end-of-text token for argmax pooling
    return {'image': image.to(device), 'text': text.to(device)}


@torch.no_grad()
def add_cached_reference(batch: dict, reference: CLIPModel, precision: str, chunk: int = 256) -> dict:
    """Precompute the reference's features once, as ``composer-jest embed-reference`` would write them.

    Columns: L2-normalised float16 image/text features and the scale/bias repeated per sample.
    """
    towers = reference.towers.eval()
    device = batch['image'].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'amp_bf16')
    image_feats, text_feats = [], []
    with autocast:
        for start in range(0, batch['image'].shape[0], chunk):
            out = towers(batch['image'][start:start + chunk], batch['text'][start:start + chunk])
            image_feats.append(out['image_features'].float())
            text_feats.append(out['text_features'].float())
    n = batch['image'].shape[0]
    columns = (
        F.normalize(torch.cat(image_feats), dim=-1).half(),
        F.normalize(torch.cat(text_feats), dim=-1).half(),
        out['logit_scale'].float().reshape(-1)[:1].expand(n).contiguous(),  # the scale itself, not its log
        out['logit_bias'].float().reshape(-1)[:1].expand(n).contiguous(),
    )
    return {**batch, **dict(zip(CACHED_REFERENCE_KEYS, columns))}


def native_patch(clip: torch.nn.Module) -> int:
    return int(clip.visual.patch_size[0])


def run_config(
    config: Config,
    args: argparse.Namespace,
    reference: CLIPModel,
    batches: dict[tuple[int, bool], dict],
    profile: bool = False,
) -> Result:
    """Train ``args.warmup + args.steps`` steps of ``config`` with a fresh learner; return the timed steps."""
    torch.manual_seed(0)
    b = args.batch_size
    f = config.filter_ratio
    n = b if f is None else int(round(b / (1.0 - f)))
    probe = reference.towers.clip
    low = 2 * native_patch(probe)
    learner = CLIPModel(args.model, low_res_fraction=0.5 if config.multires else 0.0,
                        low_res_patch_size=low if config.multires else None)
    algorithms = []
    if f is not None:
        algorithms.append(JEST(
            reference='cached' if config.cached else reference,
            filter_ratio=f,
            learner_patch_size=low if config.flexi else None,
            n_chunks=16,
            seed=0,
        ))
    batch = batches[(n, config.cached)]
    loader = DataLoader(OneBatchLoader(batch, args.warmup + args.steps), batch_size=None)
    timer = StepTimer()
    trainer = Trainer(
        model=learner,
        train_dataloader=loader,
        max_duration=f'{args.warmup + args.steps}ba',
        optimizers=DecoupledAdamW(learner.parameters(), lr=1e-3, weight_decay=1e-4),  # as yamls/quickstart.yaml
        algorithms=algorithms,
        callbacks=[timer],
        device='gpu' if args.device == 'cuda' else 'cpu',
        precision=args.precision,
        device_train_microbatch_size=b,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=0,
    )
    profiler = cProfile.Profile() if profile else None
    with contextlib.ExitStack() as stack:
        if profiler is not None:
            stack.callback(profiler.disable)
            profiler.enable()
        trainer.fit()
    trainer.close()
    timed = timer.marks[args.warmup:]

    def span(a: str, z: str) -> list[float]:
        return [1e3 * (m[z] - m[a]) for m in timed]

    flops_kwargs = dict(
        superbatch=n, subbatch=b, learner_patch_size=low if config.flexi else None,
        reference_cached=config.cached, low_res_fraction=0.5 if config.multires else 0.0,
        low_res_patch_size=low if config.multires else None,
    )
    if f is None:  # uniform: training only
        flops = step_flops(probe, **flops_kwargs)
        flops_img = step_flops(probe, include_text=False, **flops_kwargs)
        flops = {'ratio': flops['train'] / flops['uniform_train']}
        flops_img = {'ratio': flops_img['train'] / flops_img['uniform_train']}
    else:
        flops = step_flops(probe, **flops_kwargs)
        flops_img = step_flops(probe, include_text=False, **flops_kwargs)
    result = Result(
        config, n, b, span('start', 'end'), span('start', 'selected'),
        span('before_forward', 'after_loss'), span('after_loss', 'after_backward'), flops, flops_img,
    )
    if profiler is not None:
        report_profile(profiler, result)
    return result


def report_profile(profiler: cProfile.Profile, result: Result) -> None:
    """Where the time of the profiled configuration goes: cumulative time of the functions that matter."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    # (label, predicate on (filename, function name)); cumulative seconds summed over matches.
    watched = [
        ('JEST selection (AFTER_DATALOADER), total', lambda f, n: n == '_select' and 'composer_jest' in f),
        ('  learner scoring forward (+ live reference)', lambda f, n: n == '_features' and 'composer_jest' in f),
        ('  jest_select: blockwise scores, sampler, stats', lambda f, n: n == 'jest_select'),
        ('    blockwise_sample (draw + conditional updates)', lambda f, n: n == 'blockwise_sample'),
        ('    stat_partials (logged statistics only)', lambda f, n: n == 'stat_partials'),
        ('  subset_batch (gather the sub-batch)', lambda f, n: n == 'subset_batch'),
        ('FlexiViT kernel resize (all calls)', lambda f, n: n == 'resize_patch_embed'),
        ('autograd backward (run_backward)', lambda f, n: 'run_backward' in n),
        ('optimizer update (DecoupledAdamW)', lambda f, n: n == 'adamw' and 'composer' in f),
    ]
    totals = [0.0] * len(watched)
    for (filename, _line, func), (_cc, _nc, _tt, cumtime, _callers) in stats.stats.items():
        for i, (_label, match) in enumerate(watched):
            if match(filename, func):
                totals[i] += cumtime
    steps = len(result.step_ms)
    print(f'\ncProfile of {result.config.name} (f={result.config.filter_ratio}, N={result.superbatch}, '
          f'b={result.subbatch}): cumulative seconds over all profiled steps (warmup included); '
          f'timed steps {sum(result.step_ms) / 1e3:.3f} s for {steps} steps')
    for (label, _match), total in zip(watched, totals):
        print(f'  {label:<52s} {total:8.3f} s')
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats('tottime').print_stats(12)
    print('\n'.join(line for line in stream.getvalue().splitlines() if line.strip())[:4000])


def _random_features(n: int, dim: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        'image_features': F.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(device),
        'text_features': F.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(device),
        'logit_scale': torch.tensor(10.0, device=device),
        'logit_bias': torch.tensor(-10.0, device=device),
    }


def time_sampler(
    sizes: list[int], device: torch.device, embed_dim: int, reps: int, select_max_n: int
) -> list[dict[str, Any]]:
    """Median time of ``joint_sample`` (N x N random scores) and of the whole ``jest_select`` per N.

    ``jest_select`` (blockwise learner and reference scores, sampler, logged statistics; no ``N x N``
    temporary) is skipped above ``select_max_n``.
    """
    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        scores = torch.randn(n, n, generator=gen).to(device)
        n_select = int(n * 0.2)

        with_select = n <= select_max_n
        learner, reference = (_random_features(n, embed_dim, gen, device) for _ in range(2))
        sample_ms, select_ms = [], []
        for rep in range(reps + 1):
            sampler_gen = torch.Generator().manual_seed(rep)
            _sync(device)
            t0 = time.perf_counter()
            joint_sample(scores, n_select, 16, sampler_gen)
            _sync(device)
            t1 = time.perf_counter()
            if with_select:
                jest_select(learner, reference, n_select, n_chunks=16, generator=sampler_gen)
                _sync(device)
            t2 = time.perf_counter()
            if rep:  # the first repetition is warmup
                sample_ms.append(1e3 * (t1 - t0))
                select_ms.append(1e3 * (t2 - t1))
        rows.append({'N': n, 'n_select': n_select, 'joint_sample_ms': statistics.median(sample_ms),
                     'jest_select_ms': statistics.median(select_ms) if with_select else float('nan')})
        del scores, learner, reference
    return rows


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def print_table(results: list[Result]) -> None:
    uniform = next(r for r in results if r.config.name == 'uniform').median
    header = ('| config | f | N | b | ms/step | select ms | fwd+loss ms | bwd ms | opt+other ms | × uniform (time) '
              '| × uniform (FLOPs) | × uniform (image FLOPs) |')
    print(header)
    print('|---|' + '---:|' * (header.count('|') - 2))
    for r in results:
        f = '–' if r.config.filter_ratio is None else f'{r.config.filter_ratio:g}'
        select, fwd, bwd = (statistics.median(x) for x in (r.select_ms, r.forward_ms, r.backward_ms))
        rest = r.median - select - fwd - bwd
        print(f'| {r.config.name} | {f} | {r.superbatch} | {r.subbatch} | {r.median:.1f} '
              f'| {select:.1f} | {fwd:.1f} | {bwd:.1f} | {rest:.1f} | {r.median / uniform:.2f} '
              f'| {r.flops["ratio"]:.2f} | {r.flops_image_only["ratio"]:.2f} |')


def main(argv: Optional[list[str]] = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--model', choices=('jest-tiny', 'jest-vit-b-16'), default='jest-tiny')
    parser.add_argument('--precision', choices=('fp32', 'amp_bf16'), default='fp32')
    parser.add_argument('--batch-size', type=int, default=64, help='trained (sub-)batch size b')
    parser.add_argument('--steps', type=int, default=8, help='timed steps per configuration and repeat')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    parser.add_argument('--repeats', type=int, default=2,
                        help='run the list of configurations this many times, interleaved (noise on a shared box)')
    parser.add_argument('--filter-ratios', type=str, default='0.5,0.8,0.9')
    parser.add_argument('--sampler-sizes', type=str, default='1024,2048,4096,8192,16384',
                        help="comma-separated N for the sampler table ('' to skip); the step benchmark's N are added")
    parser.add_argument('--sampler-reps', type=int, default=3)
    parser.add_argument('--select-max-n', type=int, default=None,
                        help='largest N for the full jest_select timing (default: 8192 on CPU, no limit on CUDA)')
    parser.add_argument('--quick', action='store_true', help='f=0.8 only, 1+3 steps, 1 repeat, sampler up to N=4096')
    parser.add_argument('--profile', action='store_true', help='cProfile the f=0.8 all-savings configuration')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads on CPU (default 1: robust on a shared machine)')
    args = parser.parse_args(argv)
    if args.quick:
        args.filter_ratios, args.steps, args.warmup, args.repeats = '0.8', 3, 1, 1
        args.sampler_sizes, args.sampler_reps = '1024,2048,4096', 1
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda but CUDA is not available')
    if args.device == 'cpu':
        torch.set_num_threads(args.threads or 1)
    if args.select_max_n is None:
        args.select_max_n = 8192 if args.device == 'cpu' else 1 << 30
    logging.getLogger('composer').setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice
    warnings.filterwarnings('ignore')
    device = torch.device(args.device)
    ratios = [float(x) for x in args.filter_ratios.split(',') if x]

    torch.manual_seed(0)
    reference = CLIPModel(args.model)  # random weights: timing does not depend on them
    if args.device == 'cuda':
        reference = reference.to(device)
    clip = reference.towers.clip
    b = args.batch_size
    sizes = sorted({b} | {int(round(b / (1.0 - f))) for f in ratios})
    batches: dict[tuple[int, bool], dict] = {}
    for n in sizes:
        batches[(n, False)] = make_batch(clip, n, device, seed=n)
        if n != b:
            batches[(n, True)] = add_cached_reference(batches[(n, False)], reference, args.precision)

    configs = [Config('uniform', None), Config('uniform+multires', None, multires=True)]
    for f in ratios:
        configs += [
            Config('jest', f),
            Config('jest+flexi', f, flexi=True),
            Config('jest+flexi+cached', f, flexi=True, cached=True),
            Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True),
        ]
    results: dict[int, Result] = {}
    for repeat in range(args.repeats):
        for i, config in enumerate(configs):
            t0 = time.perf_counter()
            r = run_config(config, args, reference, batches)
            if i in results:
                for key in ('step_ms', 'select_ms', 'forward_ms', 'backward_ms'):
                    getattr(results[i], key).extend(getattr(r, key))
            else:
                results[i] = r
            print(f'# repeat {repeat}: {config.name} f={config.filter_ratio}: {r.median:.1f} ms/step '
                  f'({time.perf_counter() - t0:.1f} s)', flush=True)
    ordered = [results[i] for i in range(len(configs))]

    print(f'\nStep cost: model={args.model} device={args.device} precision={args.precision} b={b}; '
          f'median of {args.repeats}x{args.steps} steps (each run after {args.warmup} warmup); '
          f'torch threads={torch.get_num_threads()}\n')
    print_table(ordered)

    sampler_sizes = sorted({int(x) for x in args.sampler_sizes.split(',') if x} | set(sizes) - {b}) \
        if args.sampler_sizes else []
    if sampler_sizes:
        embed_dim = int(clip.visual.proj.shape[-1]) if clip.visual.proj is not None else 512
        rows = time_sampler(sampler_sizes, device, embed_dim, args.sampler_reps, args.select_max_n)
        best = {r.superbatch: r.median for r in ordered if r.config.name == 'jest+flexi+cached+multires'}
        print(f'\nJoint sampler (n_select = int(0.2 N), 16 chunks) and full jest_select (d={embed_dim}), median ms; '
              'last column: joint_sample as a share of the measured all-savings step with that N\n')
        print('| N | n_select | joint_sample ms | jest_select ms | % of step |')
        print('|---:|---:|---:|---:|---:|')
        for row in rows:
            share = f"{100 * row['joint_sample_ms'] / best[row['N']]:.1f}%" if row['N'] in best else ''
            select = '' if row['jest_select_ms'] != row['jest_select_ms'] else f"{row['jest_select_ms']:.1f}"
            print(f"| {row['N']} | {row['n_select']} | {row['joint_sample_ms']:.1f} | {select} | {share} |")

    if args.profile:
        f = 0.8
        n = int(round(b / (1.0 - f)))
        if (n, True) not in batches:
            batches[(n, False)] = make_batch(clip, n, device, seed=n)
            batches[(n, True)] = add_cached_reference(batches[(n, False)], reference, args.precision)
        run_config(Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True), args,
                   reference, batches, profile=True)
    return ordered


if __name__ == '__main__':
    main()
