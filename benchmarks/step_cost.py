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

Captions: token lengths are drawn from an alt-text-like distribution (``--captions``, see
:func:`caption_lengths_for`), so the text towers -- which encode every caption in length buckets up to its own
end-of-text token (``CLIPTowers.encode_text``) -- cost what they would on real data; the worst case, every caption
at the full context, is kept as extra rows marked ``[full context]`` (their ratios are against the uniform step
on the same full-context captions). Each row reports MFU, the analytic model FLOPs of the step (``flops.step_flops``
on that batch's caption lengths) / step time / ``--peak-flops`` (default: the H100's dense bf16 peak on CUDA).

The trained model's optimizer is ``--optimizer`` (default ``fused_decoupled_adamw``; one ``uniform`` row uses the
other, Composer's ``DecoupledAdamW``); ``--compile`` compiles the model through Composer's ``compile_config``,
``--compile-scoring`` only JEST's scoring forward; ``--text-buckets`` / ``--text-bucket-overhead`` set the
``CLIPTowers`` bucket plan. ``--clock process`` times CPU time instead of wall time (CPU only: robust on a shared
machine).

A table of **analytic** ratios for ViT-B/16 (224 px, context 64; the paper's setting) at each caption distribution
follows (``--analytic-only`` prints only that); ``--text-tower-only N`` times only the learner's text scoring
forward on ``N`` captions for several bucket settings.

Then the joint sampler alone (``joint_sample`` on a random ``N x N`` matrix, ``n_select = 0.2 N``, 16 chunks)
and ``jest_select`` (blockwise scores of both models + sampler + statistics) for several ``N``.

Examples::

    python benchmarks/step_cost.py --device cpu --model jest-tiny --batch-size 64
    python benchmarks/step_cost.py --device cuda --model jest-vit-b-16 --precision amp_bf16 --batch-size 256
    python benchmarks/step_cost.py --quick --profile
    python benchmarks/step_cost.py --analytic-only
    python benchmarks/step_cost.py --device cpu --clock process --sampler-sizes ''
    python benchmarks/step_cost.py --text-tower-only 1280 --device cuda --model jest-vit-b-16 --precision amp_bf16
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import math
import pstats
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import open_clip
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.selection import joint_sample
from composer_jest.core.step import SelectionSettings, select_step
from composer_jest.jest.algorithm import JEST
from composer_jest.models.clip import CLIPModel
from composer_jest.models.flops import bucketed_text_flops, step_flops
from composer_jest.models.text_buckets import (
    DEFAULT_TEXT_BUCKET_OVERHEAD,
    DEFAULT_TEXT_BUCKETS,
    bucket_plan,
    caption_lengths,
    encoded_positions,
    length_histogram,
)
from composer_jest.run.optim import FusedDecoupledAdamW

CAPTIONS = ('cc3m', 'fashion-web', 'full')
OPTIMIZERS = ('fused_decoupled_adamw', 'decoupled_adamw')
H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, dense (no sparsity) bf16 tensor-core peak of an H100 SXM

# Token-length histogram (BPE tokens incl. start- and end-of-text) of 2,000 captions of the Fashion-web pool as the
# learning-efficiency benchmark renders it (composer_jest/data/fashion_web.py: WebNoise(0.25, 0.15, 0.15),
# LongTail(), open_clip's SimpleTokenizer): mean 13.6, median 14, p90 20, max 26 tokens; 1.13 BPE tokens per word.
FASHION_WEB_LENGTH_COUNTS = {3: 53, 4: 23, 5: 2, 6: 11, 7: 87, 8: 134, 9: 82, 10: 133, 11: 109, 12: 178, 13: 172,
                             14: 181, 15: 154, 16: 149, 17: 126, 18: 116, 19: 87, 20: 60, 21: 47, 22: 49, 23: 29,
                             24: 16, 25: 1, 26: 1}
# CC3M alt-text: mean 10.3, median 9 words per caption (Changpinyo et al. 2021, CC12M paper, Table 1, as recalled;
# not re-checked offline). Words ~ LogNormal(ln 9, σ) with exp(σ²/2) = 10.3 / 9; 1.3 BPE tokens per word (an
# assumption for real alt-text: names, numbers and punctuation split into more pieces than Fashion-web's 1.13);
# + 2 for start/end-of-text; at least 3. Mean ≈ 15.3 tokens, median ≈ 14, ~8% above 32.
CC3M_MEDIAN_WORDS, CC3M_MEAN_WORDS, BPE_PER_WORD = 9.0, 10.3, 1.3


@dataclass
class Config:
    """One benchmarked training setup."""

    name: str
    filter_ratio: Optional[float]  # None: uniform (no JEST)
    flexi: bool = False
    cached: bool = False
    multires: bool = False
    captions: Optional[str] = None  # None: the --captions distribution; 'full': every caption at the context
    optimizer: Optional[str] = None  # None: --optimizer
    pack: bool = True  # CLIPTowers.pack: multi-group encodes in one packed transformer call
    compile_selection: bool = False  # JEST(compile_selection=...): see selection_compile_options

    def label(self) -> str:
        tags = [f'[{self.captions} context]' if self.captions == 'full' else '',
                f'[{self.optimizer}]' if self.optimizer else '', '' if self.pack else '[one call per group]',
                '[compiled selection]' if self.compile_selection else '']
        return ' '.join([self.name] + [t for t in tags if t])


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
    model_flops: float  # analytic FLOPs of one step of this configuration (scoring + training)

    @property
    def median(self) -> float:
        return statistics.median(self.step_ms)


class StepTimer(Callback):
    """Wall-clock time of each training step and of its phases; synchronises CUDA at every mark."""

    def __init__(self, clock: str = 'wall') -> None:
        self.marks: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        # 'process': this process's CPU time -- on a shared CPU box, immune to waiting for other jobs' cores
        self._clock = time.process_time if clock == 'process' else time.perf_counter

    def _mark(self, state: State, key: str) -> None:
        if state.device.name == 'gpu':
            torch.cuda.synchronize()
        self._current[key] = self._clock()

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


def caption_lengths_for(captions: str, n: int, context: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` caption token lengths (start- and end-of-text included), capped at ``context``.

    ``cc3m``: CC3M-like alt-text (see ``CC3M_MEDIAN_WORDS``); ``fashion-web``: the measured Fashion-web histogram;
    ``full``: every caption fills the context (the worst case).
    """
    if captions == 'full':
        return torch.full((n,), context, dtype=torch.long)
    if captions == 'fashion-web':
        values = torch.tensor(list(FASHION_WEB_LENGTH_COUNTS))
        weights = torch.tensor(list(FASHION_WEB_LENGTH_COUNTS.values()), dtype=torch.float)
        lengths = values[torch.multinomial(weights, n, replacement=True, generator=gen)]
    elif captions == 'cc3m':
        sigma = math.sqrt(2.0 * math.log(CC3M_MEAN_WORDS / CC3M_MEDIAN_WORDS))
        words = torch.empty(n).log_normal_(math.log(CC3M_MEDIAN_WORDS), sigma, generator=gen)
        lengths = (BPE_PER_WORD * words).round().long() + 2
    else:
        raise ValueError(f'captions must be one of {CAPTIONS}, got {captions!r}')
    return lengths.clamp(3, context)


def make_batch(clip: torch.nn.Module, n: int, device: torch.device, seed: int,
               captions: str = 'cc3m') -> dict[str, torch.Tensor]:
    """Random images, and token ids with caption lengths from ``captions`` (timing depends only on the lengths)."""
    gen = torch.Generator().manual_seed(seed)
    size = clip.visual.image_size
    image = torch.randn(n, 3, size[0], size[1], generator=gen)
    vocab, context = clip.token_embedding.num_embeddings, clip.context_length
    lengths = caption_lengths_for(captions, n, context, gen)
    text = torch.randint(1, vocab - 1, (n, context), generator=gen)
    positions = torch.arange(context)
    text[positions >= lengths[:, None]] = 0  # padding after the caption
    text[torch.arange(n), lengths - 1] = vocab - 1  # the end-of-text token (the largest id: argmax pooling)
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


def configure_text_buckets(model: CLIPModel, args: argparse.Namespace) -> None:
    """``--text-buckets`` / ``--text-bucket-overhead`` onto the model's towers (defaults: ``CLIPTowers``'s)."""
    if args.text_buckets is not None:
        model.towers.text_buckets = args.text_buckets
    if args.text_bucket_overhead is not None:
        model.towers.text_bucket_overhead = args.text_bucket_overhead


def selection_compile_options(args: argparse.Namespace) -> dict:
    """``--compile-selection``'s ``torch.compile`` options: a CUDA graph on a GPU, inductor's default on a CPU."""
    return {'mode': 'reduce-overhead'} if args.device == 'cuda' else {}


def native_patch(clip: torch.nn.Module) -> int:
    return int(clip.visual.patch_size[0])


def run_config(
    config: Config,
    args: argparse.Namespace,
    reference: CLIPModel,
    batches: dict[tuple[int, bool, str], dict],
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
    configure_text_buckets(learner, args)
    learner.towers.pack = config.pack
    algorithms = []
    if f is not None:
        algorithms.append(JEST(
            reference='cached' if config.cached else reference,
            filter_ratio=f,
            learner_patch_size=low if config.flexi else None,
            n_chunks=16,
            seed=0,
            compile_scoring=args.compile_scoring,
            compile_selection=selection_compile_options(args) if config.compile_selection else False,
        ))
    captions = config.captions or args.captions
    batch = batches[(n, config.cached, captions)]
    optimizer_name = config.optimizer or args.optimizer
    optimizer_cls = FusedDecoupledAdamW if optimizer_name == 'fused_decoupled_adamw' else DecoupledAdamW
    loader = DataLoader(OneBatchLoader(batch, args.warmup + args.steps), batch_size=None)
    timer = StepTimer(args.clock)
    trainer = Trainer(
        model=learner,
        train_dataloader=loader,
        max_duration=f'{args.warmup + args.steps}ba',
        optimizers=optimizer_cls(learner.parameters(), lr=1e-3, weight_decay=1e-4),  # as yamls/quickstart.yaml
        algorithms=algorithms,
        callbacks=[timer],
        device='gpu' if args.device == 'cuda' else 'cpu',
        precision=args.precision,
        device_train_microbatch_size=b,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=0,
        compile_config={} if args.compile else None,
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
        text_length_counts=length_histogram(caption_lengths(batch['text']), batch['text'].shape[1]),
        text_buckets=learner.towers.text_buckets, text_bucket_overhead=learner.towers.text_bucket_overhead,
    )
    flops = step_flops(probe, **flops_kwargs)
    flops_img = step_flops(probe, include_text=False, **flops_kwargs)
    model_flops = flops['total']
    if f is None:  # uniform: training only
        model_flops = flops['train']
        flops = {'ratio': flops['train'] / flops['uniform_train']}
        flops_img = {'ratio': flops_img['train'] / flops_img['uniform_train']}
    result = Result(
        config, n, b, span('start', 'end'), span('start', 'selected'),
        span('before_forward', 'after_loss'), span('after_loss', 'after_backward'), flops, flops_img, model_flops,
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
    sizes: list[int], device: torch.device, embed_dim: int, reps: int, select_max_n: int,
    compile_options: Optional[dict] = None,
) -> list[dict[str, Any]]:
    """Median time of ``joint_sample`` (N x N random scores) and of the whole selection step per N.

    The step is the package's own :func:`~composer_jest.core.step.select_step` on given learner and reference
    features (``jest_select``'s blockwise scores, sampler and logged statistics, no ``N x N`` temporary, plus the
    step's one host sync); skipped above ``select_max_n``. With ``compile_options``, the step with
    ``SelectionSettings(compile=...)`` is timed too (after 3 untimed calls: compilation, CUDA-graph recording) and
    must pick what eager picks.
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
                select_step({}, _step_settings(n, n_select), sampler_gen, learner=learner, reference=reference)
                _sync(device)
            t2 = time.perf_counter()
            if rep:  # the first repetition is warmup
                sample_ms.append(1e3 * (t1 - t0))
                select_ms.append(1e3 * (t2 - t1))
        row = {'N': n, 'n_select': n_select, 'joint_sample_ms': statistics.median(sample_ms),
               'jest_select_ms': statistics.median(select_ms) if with_select else float('nan')}
        if compile_options is not None and with_select:
            row['jest_select_compiled_ms'] = _time_compiled_select(learner, reference, n_select, device, reps,
                                                                   compile_options)
        rows.append(row)
        del scores, learner, reference
    return rows


def _step_settings(n: int, n_select: int, compile_options: Optional[dict] = None) -> SelectionSettings:
    """The selection settings of the timed step: ``n_select`` of ``n``, 16 chunks, the sigmoid loss."""
    return SelectionSettings(filter_ratio=1 - n_select / n, n_chunks=16, loss='sigmoid', compile=compile_options)


def _time_compiled_select(learner, reference, n_select: int, device: torch.device, reps: int,
                          options: dict) -> float:
    """Median ms of the compiled selection step; raises if it picks other examples than eager."""
    times = []
    n = learner['image_features'].shape[0]
    for rep in range(reps + 3):
        eager = select_step({}, _step_settings(n, n_select), torch.Generator().manual_seed(rep), learner=learner,
                            reference=reference)
        _sync(device)
        t0 = time.perf_counter()
        picked = select_step({}, _step_settings(n, n_select, options), torch.Generator().manual_seed(rep),
                             learner=learner, reference=reference)
        _sync(device)
        if rep >= 3:
            times.append(1e3 * (time.perf_counter() - t0))
        if not torch.equal(picked.indices, eager.indices):
            raise AssertionError(f'compiled selection step ({options}) picked other examples than eager at rep {rep}')
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def print_table(results: list[Result], peak_flops: Optional[float]) -> None:
    """The step table; time ratios are against the uniform step on the same captions (default optimizer)."""
    uniform = {r.config.captions: r.median for r in results if r.config.name == 'uniform' and not r.config.optimizer}
    header = ('| config | f | N | b | ms/step | select ms | fwd+loss ms | bwd ms | opt+other ms | × uniform (time) '
              '| × uniform (FLOPs) | × uniform (image FLOPs) | TFLOP/step | MFU |')
    print(header)
    print('|---|' + '---:|' * (header.count('|') - 2))
    for r in results:
        f = '–' if r.config.filter_ratio is None else f'{r.config.filter_ratio:g}'
        select, fwd, bwd = (statistics.median(x) for x in (r.select_ms, r.forward_ms, r.backward_ms))
        rest = r.median - select - fwd - bwd
        mfu = f'{100 * r.model_flops / (r.median / 1e3) / peak_flops:.1f}%' if peak_flops else '–'
        print(f'| {r.config.label()} | {f} | {r.superbatch} | {r.subbatch} | {r.median:.1f} '
              f'| {select:.1f} | {fwd:.1f} | {bwd:.1f} | {rest:.1f} | {r.median / uniform[r.config.captions]:.2f} '
              f'| {r.flops["ratio"]:.2f} | {r.flops_image_only["ratio"]:.2f} | {r.model_flops / 1e12:.4g} | {mfu} |')


ANALYTIC_CONFIGS = (  # (name, learner_patch_size x native, cached, multires)
    ('jest', False, False, False),
    ('jest+flexi', True, False, False),
    ('jest+flexi+cached', True, True, False),
    ('jest+flexi+cached+multires', True, True, True),
)


def analytic_table(model: str, b: int, ratios: list[float], seed: int = 0) -> None:
    """``step_flops`` ratios (JEST step / uniform step, both towers) for ``model`` at each caption distribution.

    Columns: every caption at the full context; CC3M-like lengths encoded with one trim to the super-batch's
    longest caption (the code before length buckets); CC3M-like and Fashion-web lengths in length buckets; and the
    lower bound, every caption at its own length (one bucket per distinct length).
    """
    cfg = open_clip.get_model_config(model)
    with torch.device('meta'):  # shapes only: no memory, no initialisation
        clip = open_clip.CLIP(**cfg, nonscalar_logit_scale=True)
    low = 2 * native_patch(clip)
    context = clip.context_length
    default = (DEFAULT_TEXT_BUCKETS, DEFAULT_TEXT_BUCKET_OVERHEAD)
    plan_name = f'≤ {DEFAULT_TEXT_BUCKETS} buckets, overhead {DEFAULT_TEXT_BUCKET_OVERHEAD}'
    columns = [('full context', 'full', (1, 0)), ('cc3m, one trim', 'cc3m', (1, 0)),
               (f'cc3m, {plan_name}', 'cc3m', default), ('cc3m, own lengths', 'cc3m', (context, 0)),
               (f'fashion-web, {plan_name}', 'fashion-web', default)]
    print(f'\nAnalytic step cost, {model} (context {context}), b = {b}: × a uniform step on the same captions '
          '(flops.step_flops, both towers; image tower only in brackets)\n')
    print('| config | f | N | ' + ' | '.join(name for name, _, _ in columns) + ' |')
    print('|---|---:|---:|' + '---:|' * len(columns))
    encoded, lines = {}, []
    for f in ratios:
        n = int(round(b / (1.0 - f)))
        counts = {captions: length_histogram(caption_lengths_for(captions, n, context, torch.Generator().manual_seed(
            seed)), context) for captions in CAPTIONS}
        for name, flexi, cached, multires in ANALYTIC_CONFIGS:
            cells = []
            for _, captions, buckets in columns:
                kw = dict(superbatch=n, subbatch=b, learner_patch_size=low if flexi else None, reference_cached=cached,
                          low_res_fraction=0.5 if multires else 0.0, low_res_patch_size=low if multires else None,
                          text_length_counts=counts[captions], text_buckets=buckets[0],
                          text_bucket_overhead=buckets[1])
                both, image = step_flops(clip, **kw), step_flops(clip, include_text=False, **kw)
                cells.append(f"{both['ratio']:.3f} ({image['ratio']:.3f})")
                encoded[(n, captions, buckets)] = encoded_positions(bucket_plan(counts[captions], *buckets)) / n
            print(f'| {name} | {f:g} | {n} | ' + ' | '.join(cells) + ' |')
        mean_len = {c: sum(i * k for i, k in enumerate(counts[c])) / sum(counts[c]) for c in CAPTIONS}
        lines.append(f'- N = {n}: ' + '; '.join(f'{name}: {encoded[(n, c, k)]:.1f} (own {mean_len[c]:.1f})'
                                                for name, c, k in columns))
    print('\nEncoded positions per scored caption (mean):\n' + '\n'.join(lines))


def time_text_tower(model: str, n: int, captions: str, device: torch.device, reps: int,
                    precision: str, clock_name: str = 'wall') -> None:
    """The learner's text scoring forward alone: one trim to the longest caption vs length buckets.

    ``n`` captions of the ``captions`` distribution, encoded under ``torch.inference_mode`` (as fast scoring does)
    with ``CLIPTowers.text_buckets`` = 1 (the code before buckets), 2, 4, 8 and one bucket per distinct length,
    each as one packed transformer call and as one call per bucket (``CLIPTowers.pack``); median of ``reps``
    timed calls after one warmup, next to the analytic FLOPs of the same plan.
    """
    clock = time.process_time if clock_name == 'process' else time.perf_counter
    torch.manual_seed(0)
    towers = CLIPModel(model).towers.eval().to(device)
    clip = towers.clip
    text = make_batch(clip, n, device, seed=n, captions=captions)['text']
    counts = length_histogram(caption_lengths(text), clip.context_length)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'amp_bf16')
    rows = []
    settings = [(1, 0), (2, 0), (4, 0), (8, 0), (clip.context_length, 0),
                (DEFAULT_TEXT_BUCKETS, DEFAULT_TEXT_BUCKET_OVERHEAD)]
    for buckets, overhead in settings:
        towers.text_buckets, towers.text_bucket_overhead = buckets, overhead
        medians = []
        for pack in (True, False):
            towers.pack = pack
            times = []
            with torch.inference_mode(), autocast:
                for rep in range(reps + 1):
                    _sync(device)
                    t0 = clock()
                    towers.encode_text(text)
                    _sync(device)
                    if rep:
                        times.append(1e3 * (clock() - t0))
            medians.append(statistics.median(times))
        plan = bucket_plan(counts, buckets, overhead)
        rows.append((buckets, overhead, len(plan), encoded_positions(plan) / n, *medians,
                     bucketed_text_flops(clip, counts, buckets, overhead)))
    print(f'\nText tower scoring forward alone: {model}, N = {n} {captions} captions (mean own length '
          f'{sum(i * c for i, c in enumerate(counts)) / n:.1f} tokens), {device.type}, {precision}, inference mode; '
          f'{clock_name} clock, median of {reps}\n')
    print('| text_buckets | overhead | buckets | positions / caption | ms, packed | ms, one call per bucket '
          '| GFLOP (analytic) | × one trim (time, packed) | × one trim (time, per bucket) | × one trim (FLOPs) |')
    print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    base = rows[0][5]  # one trim, one call: the code before buckets
    for buckets, overhead, calls, positions, packed_ms, plain_ms, flops in rows:
        print(f'| {buckets} | {overhead} | {calls} | {positions:.1f} | {packed_ms:.1f} | {plain_ms:.1f} '
              f'| {flops / 1e9:.2f} | {packed_ms / base:.2f} | {plain_ms / base:.2f} | {flops / rows[0][6]:.2f} |')


def main(argv: Optional[list[str]] = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--model', choices=('jest-tiny', 'jest-tiny-b16prop', 'jest-vit-b-16'), default='jest-tiny')
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
    parser.add_argument('--captions', choices=CAPTIONS, default='cc3m',
                        help='caption token lengths of the batches (the [full context] rows are added either way)')
    parser.add_argument('--optimizer', choices=OPTIMIZERS, default='fused_decoupled_adamw',
                        help="the trained model's optimizer (a uniform row with the other one is added)")
    parser.add_argument('--text-buckets', type=int, default=None,
                        help=f'CLIPTowers.text_buckets of learner and reference (default {DEFAULT_TEXT_BUCKETS})')
    parser.add_argument('--text-bucket-overhead', type=int, default=None,
                        help=f'CLIPTowers.text_bucket_overhead in positions (default {DEFAULT_TEXT_BUCKET_OVERHEAD})')
    parser.add_argument('--compile', action='store_true', help="torch.compile the model (Composer's compile_config)")
    parser.add_argument('--compile-scoring', action='store_true', help='JEST(compile_scoring=True)')
    parser.add_argument('--compile-selection', action='store_true',
                        help="add an all-savings row with JEST(compile_selection=...) ({'mode': 'reduce-overhead'} on "
                             'cuda: one CUDA graph) and a compiled column to the jest_select table')
    parser.add_argument('--peak-flops', type=float, default=None,
                        help='peak FLOP/s for the MFU column (default on cuda: 989e12, H100 dense bf16; none on cpu)')
    parser.add_argument('--text-tower-only', type=int, default=None, metavar='N',
                        help="time only the learner's text scoring forward on N captions, by number of buckets")
    parser.add_argument('--no-extra-rows', action='store_true',
                        help="drop the side rows ([full context], the other optimizer, [one call per group])")
    parser.add_argument('--only', type=str, default=None,
                        help="comma-separated config names to run (e.g. 'uniform,jest+flexi+cached+multires'); "
                             'the uniform row on the same captions always runs (the time ratios need it)')
    parser.add_argument('--clock', choices=('wall', 'process'), default='wall',
                        help="step timer: wall time, or (CPU only) this process's CPU time, robust on a shared box")
    parser.add_argument('--analytic-only', action='store_true',
                        help='print only the analytic ViT-B/16 table (no training, no model weights)')
    args = parser.parse_args(argv)
    ratios = [float(x) for x in args.filter_ratios.split(',') if x]
    if args.analytic_only:
        analytic_table('jest-vit-b-16', args.batch_size if args.batch_size != 64 else 256, ratios)
        return []
    if args.text_tower_only:
        if args.device == 'cpu':
            torch.set_num_threads(args.threads or 1)
        logging.getLogger().setLevel(logging.ERROR)
        time_text_tower(args.model, args.text_tower_only, args.captions, torch.device(args.device),
                        args.sampler_reps, args.precision, args.clock)
        return []
    if args.peak_flops is None and args.device == 'cuda':
        args.peak_flops = H100_BF16_DENSE_PEAK
    if args.quick:
        args.filter_ratios, args.steps, args.warmup, args.repeats = '0.8', 3, 1, 1
        args.sampler_sizes, args.sampler_reps = '1024,2048,4096', 1
    if args.device == 'cuda' and args.clock == 'process':
        parser.error('--clock process measures CPU time: use it with --device cpu only')
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

    torch.manual_seed(0)
    reference = CLIPModel(args.model)  # random weights: timing does not depend on them
    configure_text_buckets(reference, args)
    if args.device == 'cuda':
        reference = reference.to(device)
    clip = reference.towers.clip
    b = args.batch_size
    sizes = sorted({b} | {int(round(b / (1.0 - f))) for f in ratios})
    batches: dict[tuple[int, bool, str], dict] = {}
    for captions in {args.captions, 'full'}:
        for n in sizes:
            batches[(n, False, captions)] = make_batch(clip, n, device, seed=n, captions=captions)
            if n != b:
                batches[(n, True, captions)] = add_cached_reference(batches[(n, False, captions)], reference,
                                                                    args.precision)

    other_optimizer = next(o for o in OPTIMIZERS if o != args.optimizer)
    configs = [Config('uniform', None), Config('uniform', None, optimizer=other_optimizer),
               Config('uniform+multires', None, multires=True), Config('uniform+multires', None, multires=True,
                                                                       pack=False)]
    for f in ratios:
        configs += [
            Config('jest', f),
            Config('jest+flexi', f, flexi=True),
            Config('jest+flexi+cached', f, flexi=True, cached=True),
            Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True),
            Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True, pack=False),
        ]
        if args.compile_selection:
            configs.append(Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True,
                                  compile_selection=True))
    if args.no_extra_rows:
        configs = [c for c in configs if c.pack and not c.optimizer]
    elif args.captions != 'full':  # the worst case: every caption at the full context
        configs.append(Config('uniform', None, captions='full'))
        configs += [Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True, captions='full')
                    for f in ratios]
    if args.only:
        names = {x.strip() for x in args.only.split(',') if x.strip()}
        known = {c.name for c in configs}
        if names - known:
            parser.error(f'--only: unknown config(s) {sorted(names - known)}; configs: {sorted(known)}')
        configs = [c for c in configs if c.name in names or (c.name == 'uniform' and not c.optimizer and c.pack)]
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
            print(f'# repeat {repeat}: {config.label()} f={config.filter_ratio}: {r.median:.1f} ms/step '
                  f'({time.perf_counter() - t0:.1f} s)', flush=True)
    ordered = [results[i] for i in range(len(configs))]

    print(f'\nStep cost: model={args.model} device={args.device} precision={args.precision} b={b}; '
          f'captions={args.captions}; optimizer={args.optimizer}; compile={args.compile}; '
          f'compile_scoring={args.compile_scoring}; text_buckets={reference.towers.text_buckets}; '
          f'median of {args.repeats}x{args.steps} steps (each run after {args.warmup} warmup); '
          f'torch threads={torch.get_num_threads()}; clock={args.clock}; MFU peak={args.peak_flops}\n')
    print_table(ordered, args.peak_flops)
    analytic_table('jest-vit-b-16', 256, ratios)

    sampler_sizes = sorted({int(x) for x in args.sampler_sizes.split(',') if x} | set(sizes) - {b}) \
        if args.sampler_sizes else []
    if sampler_sizes:
        embed_dim = int(clip.visual.proj.shape[-1]) if clip.visual.proj is not None else 512
        rows = time_sampler(sampler_sizes, device, embed_dim, args.sampler_reps, args.select_max_n,
                            selection_compile_options(args) if args.compile_selection else None)
        best = {r.superbatch: r.median for r in ordered if r.config.name == 'jest+flexi+cached+multires'}
        print(f'\nJoint sampler (n_select = int(0.2 N), 16 chunks) and full jest_select (d={embed_dim}), median ms; '
              'last column: joint_sample as a share of the measured all-savings step with that N\n')
        print('| N | n_select | joint_sample ms | jest_select ms | jest_select compiled ms | % of step |')
        print('|---:|---:|---:|---:|---:|---:|')
        for row in rows:
            share = f"{100 * row['joint_sample_ms'] / best[row['N']]:.1f}%" if row['N'] in best else ''
            select = '' if row['jest_select_ms'] != row['jest_select_ms'] else f"{row['jest_select_ms']:.1f}"
            compiled = f"{row['jest_select_compiled_ms']:.1f}" if 'jest_select_compiled_ms' in row else ''
            print(f"| {row['N']} | {row['n_select']} | {row['joint_sample_ms']:.1f} | {select} | {compiled} "
                  f"| {share} |")

    if args.profile:
        f = 0.8
        n = int(round(b / (1.0 - f)))
        if (n, True, args.captions) not in batches:
            batches[(n, False, args.captions)] = make_batch(clip, n, device, seed=n, captions=args.captions)
            batches[(n, True, args.captions)] = add_cached_reference(batches[(n, False, args.captions)], reference,
                                                                     args.precision)
        run_config(Config('jest+flexi+cached+multires', f, flexi=True, cached=True, multires=True), args,
                   reference, batches, profile=True)
    return ordered


if __name__ == '__main__':
    main()
