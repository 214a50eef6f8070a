"""One rank's share of a global JEST selection: peak extra memory, time and all-gather volume, blockwise vs dense.

Simulates rank 0 of ``W`` ranks in one process: its own ``N_local`` candidates (random unit features for a
learner and a reference, ``d`` dims) and an all-gather that returns freshly allocated copies of this rank's
payload for the other ``W - 1`` ranks (same shapes and allocation as a real all-gather; the values do not
change the cost). The bytes a rank *receives* per step are summed over the gather calls (exact for this
algorithm) and modelled at ``--link-gbps`` GB/s.

* ``blockwise``: the package's selection step, :func:`composer_jest.core.step.select_step` with
  ``scope='global', rank=0, world_size=W`` (``jest_select`` plus the step's one host sync).
* ``dense``: what every rank did before (commit 0d38a3f): all-gather all ``N_g = W N_local`` features, build
  both ``N_g x N_g`` pair-loss matrices, draw with ``joint_sample(n_groups=W)`` and compute the statistics from
  the matrix; run only where ``N_g <= --dense-max-ng``.

Each (mode, loss, W) runs in a fresh subprocess; the extra memory is the peak resident set (``VmHWM``, reset
after setup) above the resident set after setup on CPU, or ``max_memory_allocated`` above the allocated memory
after setup on CUDA. Usage::

    python benchmarks/global_selection.py --ranks 8 64 512 --loss sigmoid softmax
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from composer_jest.core.losses import sigmoid_pair_loss
from composer_jest.core.scoring import selection_flops
from composer_jest.core.selection import batch_score, joint_sample, score_matrix
from composer_jest.core.step import SelectionSettings, select_step


def _rss_kib(field: str) -> int:
    return int(re.search(rf'{field}:\s+(\d+)', open('/proc/self/status').read()).group(1))


class FakeAllGather:
    """Rank 0's view of an all-gather over ``world`` ranks; counts the bytes received from the others."""

    def __init__(self, world: int):
        self.world, self.bytes_received, self.calls = world, 0, 0

    def __call__(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        for piece in out:
            piece.copy_(tensor)
        self.bytes_received += (self.world - 1) * tensor.numel() * tensor.element_size()
        self.calls += 1
        return out


def features(n: int, dim: int, seed: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    y = F.normalize(x + torch.randn(n, dim, generator=g), dim=-1)
    return {'image_features': x.to(device), 'text_features': y.to(device),
            'logit_scale': torch.tensor(10.0, device=device), 'logit_bias': torch.tensor(-10.0, device=device)}


def dense_share(learner: dict, reference: dict, world: int, b_local: int, n_chunks: int, gather: FakeAllGather):
    """The pre-blockwise path on one rank: gather everything, N_g x N_g matrices, dense sampler, stats."""
    full = [{**f, 'image_features': torch.cat(gather(f['image_features'])),
             'text_features': torch.cat(gather(f['text_features']))} for f in (learner, reference)]
    learner_loss, reference_loss = sigmoid_pair_loss(**full[0]), sigmoid_pair_loss(**full[1])
    scores = score_matrix('learnability', learner_loss, reference_loss)
    del learner_loss, reference_loss
    b = b_local * world
    idx = joint_sample(scores, b, n_chunks, torch.Generator().manual_seed(0), n_groups=world)
    diag = torch.diagonal(scores)
    off = (scores.sum() - diag.sum()) / (scores.shape[0] * (scores.shape[0] - 1))
    return idx, float(diag.mean() + (b - 1) * off), float(batch_score(scores, idx) / b)


def blockwise_share(learner: dict, reference: dict, loss: str, world: int, args, gather: FakeAllGather, seed: int):
    """Rank 0's share of a global selection, through :func:`select_step` (features given: nothing to score)."""
    settings = SelectionSettings(filter_ratio=1 - args.b_local / args.n_local, n_chunks=args.n_chunks, loss=loss,
                                 scope='global')
    return select_step({}, settings, torch.Generator().manual_seed(seed), learner=learner, reference=reference,
                       rank=0, world_size=world, all_gather=gather)


def run_one(mode: str, loss: str, world: int, args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    learner, reference = (features(args.n_local, args.dim, seed, device) for seed in (1, 2))
    if device.type == 'cuda' and mode == 'blockwise':  # untimed warmup: CUDA/cuBLAS init, kernel loading
        blockwise_share(learner, reference, loss, world, args, FakeAllGather(world), seed=1)
    gather = FakeAllGather(world)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        open('/proc/self/clear_refs', 'w').write('5')  # reset the peak resident set to the current one
        base = _rss_kib('VmRSS') * 1024
    start = time.perf_counter()
    if mode == 'blockwise':
        if device.type == 'cuda' and args.sync_debug:  # any implicit host<->device sync inside raises
            torch.cuda.set_sync_debug_mode('error')
        stats = blockwise_share(learner, reference, loss, world, args, gather, seed=0).stats
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('default')
    else:
        _, uniform, selected = dense_share(learner, reference, world, args.b_local, args.n_chunks, gather)
        stats = {'learnability_superbatch': uniform, 'learnability_selected': selected}
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else _rss_kib('VmHWM') * 1024
    return {'mode': mode, 'loss': loss, 'ranks': world, 'N_g': world * args.n_local, 'seconds': seconds,
            'extra_peak_bytes': peak - base, 'gather_bytes_received': gather.bytes_received,
            'gather_calls': gather.calls, 'stats': stats,
            'gflop': selection_flops(loss, args.n_local, args.b_local, args.dim, n_chunks=args.n_chunks,
                                     world_size=world) / 1e9 if mode == 'blockwise' else float('nan')}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ranks', type=int, nargs='+', default=[8, 64, 512])
    parser.add_argument('--loss', nargs='+', default=['sigmoid'], choices=['sigmoid', 'softmax'])
    parser.add_argument('--modes', nargs='+', default=['blockwise', 'dense'], choices=['blockwise', 'dense'])
    parser.add_argument('--n-local', type=int, default=2560)
    parser.add_argument('--b-local', type=int, default=512)
    parser.add_argument('--dim', type=int, default=768)
    parser.add_argument('--n-chunks', type=int, default=16)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--dense-max-ng', type=int, default=20480, help='largest N_g the dense path is run at')
    parser.add_argument('--link-gbps', type=float, default=100.0, help='all-gather bandwidth model, GB/s')
    parser.add_argument('--sync-debug', action='store_true',
                        help='CUDA: fail if the blockwise selection makes any implicit host-device sync')
    parser.add_argument('--timeout', type=int, default=1800, help='seconds per configuration')
    parser.add_argument('--one', nargs=3, metavar=('MODE', 'LOSS', 'RANKS'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args)))
        return
    print(f'# N_local={args.n_local} b_local={args.b_local} d={args.dim} chunks={args.n_chunks} '
          f'device={args.device} threads={args.threads} torch={torch.__version__}')
    print('| loss | ranks | N_g | path | extra peak MiB | time s | GFLOP | all-gather MiB recv (calls) '
          f'| all-gather ms @{args.link_gbps:g} GB/s | learnability sel / uniform |')
    print('|---|---:|---:|---|---:|---:|---:|---:|---:|---|')
    forwarded = [a for a in sys.argv[1:]]
    for loss in args.loss:
        for world in args.ranks:
            for mode in args.modes:
                if mode == 'dense' and (loss != 'sigmoid' or world * args.n_local > args.dense_max_ng):
                    continue
                cmd = [sys.executable, __file__, *forwarded, '--one', mode, loss, str(world)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                          env={**os.environ, 'OMP_NUM_THREADS': str(args.threads)})
                except subprocess.TimeoutExpired:
                    print(f'| {loss} | {world} | {world * args.n_local} | {mode} | timed out after {args.timeout} s |')
                    continue
                if proc.returncode != 0:
                    print(f'| {loss} | {world} | {world * args.n_local} | {mode} | failed: '
                          f'{proc.stderr.strip().splitlines()[-1:]} |')
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                mib = r['gather_bytes_received'] / 2**20
                print(f"| {loss} | {world} | {r['N_g']} | {mode} | {r['extra_peak_bytes'] / 2**20:.0f} | "
                      f"{r['seconds']:.2f} | {r['gflop']:.0f} | {mib:.0f} ({r['gather_calls']}) | "
                      f"{1e3 * r['gather_bytes_received'] / (args.link_gbps * 1e9):.1f} | "
                      f"{r['stats']['learnability_selected']:.3f} / {r['stats']['learnability_superbatch']:.3f} |",
                      flush=True)


if __name__ == '__main__':
    main()
