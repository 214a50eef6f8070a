"""Super-batch loading throughput: MDS shards streamed from a local S3 endpoint vs read from a local directory.

The quickstart shapes set (32 px PNG, template captions) is converted once to MDS shards (zstd, 1 MB shard
limit) in a local directory and in a bucket of a ``moto_server`` started on
127.0.0.1 (or the ``--remote`` you give; credentials and ``S3_ENDPOINT_URL`` from the environment). For
each source and 0/2/4 DataLoader workers, :func:`~composer_jest.data.streaming.build_streaming_dataloader`
reads the super-batches of the quickstart (``b = 32``, ``f = 0.5``: ``N = 64``) with decoding, open_clip
preprocessing and tokenization, shuffled, from a cold cache (S3: every shard is downloaded during the run).
Reported: time to the first super-batch (worker start-up, index download), then steady-state samples/s and
ms per super-batch.

Opening a dataset checks the size and hash of every shard file already on disk (``verify_local``, see
:class:`~composer_jest.data.streaming.VerifiedStream`): its cost is timed separately, for the local
directory and for the warm S3 cache, as the time to construct the dataset with and without the check.

For comparison, the quickstart model's training step: ``CLIPModel('jest-tiny')`` forward + backward + AdamW
at batch 64 (median over steps after warm-up).

Example::

    python benchmarks/streaming_throughput.py                  # table on stdout
    python benchmarks/streaming_throughput.py --write-md BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from composer_jest.batch import superbatch_size
from composer_jest.data.convert import MDSOptions, convert_shapes
from composer_jest.data.streaming import ImageTextStreamingDataset, build_streaming_dataloader
from composer_jest.model import CLIPModel

SECTION = '## Streaming throughput'


@dataclass
class Result:
    source: str
    workers: int
    first_batch_s: float
    samples_per_s: float
    ms_per_superbatch: float


def start_moto() -> tuple[subprocess.Popen, str]:
    """A throwaway S3 endpoint on 127.0.0.1 (moto_server, auth off); returns (process, url)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / 'moto_server'
    process = subprocess.Popen([str(exe) if exe.exists() else 'moto_server', '-H', '127.0.0.1', '-p', str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    for _ in range(300):
        try:
            urllib.request.urlopen(f'{url}/moto-api/', timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError('moto_server did not start')


def time_loader(remote, local: str, tokenizer, workers: int, batch: int, filter_ratio: float,
                num_batches: int) -> tuple[float, float, float]:
    """Iterate ``num_batches`` super-batches (cold cache for a remote); (first batch s, samples/s, ms/batch)."""
    start = time.perf_counter()
    loader = build_streaming_dataloader(remote, local, tokenizer, batch_size=superbatch_size(batch, filter_ratio),
                                        num_workers=workers, shuffle_seed=workers)
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    n = superbatch_size(batch, filter_ratio)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    elapsed = time.perf_counter() - t0
    del it, loader
    return first, num_batches * n / elapsed, 1000 * elapsed / num_batches


def time_open(remote, local: str, tokenizer, verify: bool, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds to construct the dataset over ``local`` (shards already on disk)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dataset = ImageTextStreamingDataset(remote=remote, local=local, tokenizer=tokenizer, batch_size=1,
                                            verify_local=verify)
        times.append(time.perf_counter() - t0)
        del dataset
    return min(times)


def shard_bytes(local: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(local) for n in names if '.mds' in n)


def verify_table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = ['| shards on disk | MB | open, no check (s) | open, size + xxh64 check (s) | check cost (s) | MB/s |',
             '|---|---:|---:|---:|---:|---:|']
    for name, size, plain, verified in rows:
        cost = verified - plain
        lines.append(f'| {name} | {size / 1e6:.1f} | {plain:.3f} | {verified:.3f} | {cost:.3f} | '
                     f'{size / 1e6 / cost if cost > 0 else float("inf"):,.0f} |')
    return '\n'.join(lines)


def train_step_ms(batch: int, steps: int) -> float:
    """Median ms of forward + backward + AdamW step of the quickstart model at ``batch``."""
    torch.manual_seed(0)
    model = CLIPModel('jest-tiny')
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = {'image': torch.randn(batch, 3, 32, 32), 'text': torch.randint(0, 49408, (batch, 16))}
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = model.loss(model(data), data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        name = next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or 'unknown CPU'
    return f'{os.cpu_count()}-core CPU VM ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads'


def table(results: list[Result], step_ms: float, batch_step: int) -> str:
    lines = ['| source | workers | first super-batch (s) | samples/s | ms / super-batch | vs train step |',
             '|---|---:|---:|---:|---:|---:|']
    for r in results:
        lines.append(f'| {r.source} | {r.workers} | {r.first_batch_s:.2f} | {r.samples_per_s:,.0f} | '
                     f'{r.ms_per_superbatch:.1f} | {r.ms_per_superbatch / step_ms:.2f}x |')
    lines.append(f'| *train step* (jest-tiny fwd+bwd+AdamW, batch {batch_step}) | | | | {step_ms:.1f} | 1.00x |')
    return '\n'.join(lines)


def write_markdown(path: Path, body: str) -> None:
    """Add or replace this benchmark's section of ``path``, leaving the rest as it is."""
    text = path.read_text() if path.exists() else '# Benchmarks\n'
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find('\n## ', start + len(SECTION))
        text = text[:start] + body.rstrip('\n') + ('\n\n' + text[nxt + 1:] if nxt >= 0 else '')
    else:
        text = text.rstrip('\n') + '\n\n' + body
    path.write_text(text.rstrip('\n') + '\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num-samples', type=int, default=8000, help='size of the converted shapes set')
    parser.add_argument('--batch-size', type=int, default=32, help='train batch b (quickstart: 32)')
    parser.add_argument('--filter-ratio', type=float, default=0.5, help='JEST f (quickstart: 0.5): N = b / (1 - f)')
    parser.add_argument('--num-batches', type=int, default=100, help='super-batches timed after the first')
    parser.add_argument('--workers', default='0,2,4')
    parser.add_argument('--remote', default=None, help='s3://bucket/prefix to use instead of a local moto_server')
    parser.add_argument('--shard-size', default='1mb', help='MDS shard size limit (before compression)')
    parser.add_argument('--step-batch', type=int, default=64, help='batch of the timed training step')
    parser.add_argument('--write-md', default=None, help='add/replace the section in this markdown file')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore')
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    workdir = tempfile.mkdtemp(prefix='jest-stream-bench-')
    moto = None
    try:
        remote = args.remote
        if remote is None:
            moto, url = start_moto()
            os.environ.update(AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench', AWS_DEFAULT_REGION='us-east-1',
                              S3_ENDPOINT_URL=url)
            import boto3

            boto3.session.Session().client('s3', endpoint_url=url).create_bucket(Bucket='bench')
            remote = 's3://bench/shapes'
        options = MDSOptions(size_limit=args.shard_size, progress=False, overwrite=True)
        local_dir = os.path.join(workdir, 'shapes')
        t0 = time.perf_counter()
        convert_shapes(local_dir, num_samples=args.num_samples, noise=0.5, seed=2, options=options)
        convert_shapes(remote, num_samples=args.num_samples, noise=0.5, seed=2, options=options)
        num_shards = sum(name.startswith('shard.') for name in os.listdir(local_dir))
        print(f'converted {args.num_samples} samples twice in {time.perf_counter() - t0:.1f}s '
              f'({num_shards} shards)', file=sys.stderr)
        tokenizer = CLIPModel('jest-tiny').tokenizer
        n = superbatch_size(args.batch_size, args.filter_ratio)
        needed = (args.num_batches + 1) * n
        if needed > args.num_samples:
            parser.error(f'--num-samples must be >= (num_batches + 1) * N = {needed}')
        results, caches = [], []
        for workers in (int(w) for w in args.workers.split(',')):
            for source, rem in (('local dir', None), ('S3 (moto_server, 127.0.0.1)', remote)):
                # a local source is read in place; a remote one through a fresh (cold) cache directory
                local = local_dir if rem is None else tempfile.mkdtemp(prefix=f'cache-{workers}-', dir=workdir)
                first, rate, ms = time_loader(rem, local, tokenizer, workers, args.batch_size, args.filter_ratio,
                                              args.num_batches)
                results.append(Result(source, workers, first, rate, ms))
                caches += [local] if rem is not None else []
                print(f'{source} workers={workers}: {rate:,.0f} samples/s, {ms:.1f} ms/super-batch, '
                      f'first {first:.2f}s', file=sys.stderr)
        step_ms = train_step_ms(args.step_batch, steps=8)
        verify_rows = []
        for name, rem, local in (('local dir', None, local_dir), ('S3 cache (after one run)', remote, caches[-1])):
            plain, verified = (time_open(rem, local, tokenizer, verify) for verify in (False, True))
            verify_rows.append((name, shard_bytes(local), plain, verified))
            print(f'open {name}: {plain:.3f}s without the check, {verified:.3f}s with it', file=sys.stderr)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    md = table(results, step_ms, args.step_batch)
    command = 'python benchmarks/streaming_throughput.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    body = '\n'.join([
        SECTION, '',
        f'Super-batches of N = {n} (quickstart: b = {args.batch_size}, f = {args.filter_ratio}) of the shapes set '
        f'({args.num_samples} samples, 32 px PNG, {num_shards} zstd MDS shards of <= {args.shard_size}) through '
        '`build_streaming_dataloader` (decode, open_clip preprocessing, tokenization, streaming shuffle), '
        f'from a cold cache; {args.num_batches} super-batches timed after the first.', '',
        f'- machine: {machine()}',
        f'- date: {datetime.date.today().isoformat()}, commit {commit()}',
        f'- command: `{command.strip()}`', '',
        md, '',
        'With workers, loading overlaps the training step (it is hidden while ms / super-batch stays below the '
        'step); workers and training share the cores, so on a 2-core machine more than 2 workers oversubscribe. '
        'The S3 endpoint is a `moto_server` on the same machine: its request handling uses the same cores.', '',
        'Opening the dataset checks every shard file already on disk (size, then the xxh64 recorded in '
        '`index.json`; a damaged cached file is fetched again, a damaged local one is an error). Its cost, once '
        'per dataset construction (best of 3):', '',
        verify_table(verify_rows), '',
    ])
    print(body)
    print(json.dumps([r.__dict__ for r in results] + [{'train_step_ms': step_ms}]), file=sys.stderr)
    if args.write_md:
        write_markdown(Path(args.write_md), body)
    return 0


if __name__ == '__main__':
    sys.exit(main())
