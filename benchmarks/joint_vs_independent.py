"""Why does joint selection barely beat independent prioritisation on the Fashion-MNIST web pool?

Diagnostic for ``benchmarks/learning_efficiency.py`` (same data, reference and model). It trains one JEST
learner (f = 0.8, joint, seed 0) part of the way, then, on fresh super-batches of the pool, scores the
learnability matrix ``S`` (learner − reference per-pair SigLIP loss) and asks:

- how much of a batch's score ``s(B) = Σ_{i,j∈B} S_ij`` comes from the diagonal (each example alone) and how
  much from the off-diagonal pairs (the joint term that only joint selection sees);
- how spread the joint term is across candidates: the std over candidates of ``Σ_{j∈B} (S_kj + S_jk)`` for a
  full batch ``B``, next to the std of ``S_kk``: a joint term with little spread cannot change the ranking;
- how often joint and independent draws pick the same examples, and the ``s(B)`` each reaches (plus uniform
  and a greedy ascent on ``s(B)`` as the two ends), at several ``n_chunks`` and score temperatures.

Prints a table per learner checkpoint; ``--json`` writes the numbers.

    python benchmarks/joint_vs_independent.py                 # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_efficiency as le  # noqa: E402

from composer_jest.core.losses import sigmoid_pair_loss  # noqa: E402
from composer_jest.core.selection import batch_score, independent_sample, joint_sample  # noqa: E402
from composer_jest.jest.algorithm import JEST  # noqa: E402


@torch.no_grad()
def pair_loss(towers, batch: dict) -> torch.Tensor:
    out = towers(batch['image'], batch['text'])
    return sigmoid_pair_loss(out['image_features'], out['text_features'], out['logit_scale'], out['logit_bias'])


def greedy(scores: torch.Tensor, b: int) -> torch.Tensor:
    """Best-first ascent on ``s(B)``: add the candidate with the largest conditional gain, one at a time."""
    cond = scores.diagonal().clone()
    chosen = torch.zeros(len(scores), dtype=torch.bool)
    for _ in range(b):
        k = int(torch.where(chosen, torch.tensor(-float('inf')), cond).argmax())
        chosen[k] = True
        cond += scores[:, k] + scores[k, :]
    return chosen.nonzero().squeeze(1)


def decompose(scores: torch.Tensor, idx: torch.Tensor) -> tuple[float, float]:
    sub = scores[idx][:, idx]
    diag = float(sub.diagonal().sum())
    return diag, float(sub.sum()) - diag


def diagnose(learner, reference, pool: le.TensorPool, filter_ratio: float, b: int, n_batches: int,
             generator: torch.Generator) -> dict[str, Any]:
    n = int(round(b / (1.0 - filter_ratio)))
    perm = torch.randperm(len(pool), generator=generator)[: n * n_batches]
    variants = [('joint', 16, 1.0), ('joint', 4, 1.0), ('joint', 64, 1.0), ('joint', 16, 0.25), ('independent', 1, 1.0),
                ('independent', 1, 0.25)]
    acc: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        acc.setdefault(key, []).append(value)

    for t in range(n_batches):
        batch = pool.__getitems__(perm[t * n:(t + 1) * n].tolist())
        scores = pair_loss(learner, batch) - pair_loss(reference, batch)
        off = scores - torch.diag(scores.diagonal())
        add('|S_kk| mean', float(scores.diagonal().abs().mean()))
        add('|S_kj| mean (k!=j)', float(off.abs().sum() / (n * (n - 1))))
        # which pairs carry the joint term: same-class pairs (hard or false negatives) vs the rest
        same = (batch['label'][:, None] == batch['label'][None, :]).fill_diagonal_(False)
        other = (~same).fill_diagonal_(False)
        add('S_kj mean, same class', float(scores[same].mean()))
        add('S_kj mean, different class', float(scores[other].mean()))
        uniform = torch.randperm(n, generator=generator)[:b]
        # spread of the joint term a candidate sees once a whole batch is chosen, vs its own diagonal
        joint_term = off[:, uniform].sum(1) + off[uniform, :].sum(0)
        add('std S_kk', float(scores.diagonal().std()))
        add('std joint term (|B| = b)', float(joint_term.std()))
        picks = {'uniform': uniform, 'greedy': greedy(scores, b)}
        for method, chunks, temp in variants:
            name = f'{method} c{chunks} T{temp:g}'
            if method == 'joint':
                picks[name] = joint_sample(scores, b, n_chunks=chunks, generator=generator, temperature=temp)
            else:
                picks[name] = independent_sample(scores, b, generator=generator, temperature=temp)
        # a second joint draw: how much two draws of the *same* sampler overlap (the overlap noise floor)
        picks['joint c16 T1, 2nd draw'] = joint_sample(scores, b, n_chunks=16, generator=generator)
        base = set(picks['joint c16 T1'].tolist())
        for name, idx in picks.items():
            diag, offd = decompose(scores, idx)
            add(f'{name}: s(B)', float(batch_score(scores, idx)))
            add(f'{name}: diagonal', diag)
            add(f'{name}: off-diagonal', offd)
            add(f'{name}: clean %', 100 * float(batch['clean'][idx].mean()))
            add(f'{name}: overlap with joint c16 T1 %', 100 * len(base & set(idx.tolist())) / b)
            sub_labels = batch['label'][idx]
            add(f'{name}: same-class pairs %', 100 * float((sub_labels[:, None] == sub_labels[None, :]).float()
                                                            .fill_diagonal_(0).sum()) / (b * (b - 1)))
    return {k: (float(torch.tensor(v).mean()), float(torch.tensor(v).std())) for k, v in acc.items()}


class Snapshots(LoggerDestination):
    """Keeps a frozen copy of the learner's towers after the given training steps."""

    def __init__(self, steps):
        self.steps, self.towers = set(steps), {}

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step in self.steps:
            self.towers[step] = state.model.frozen_copy()


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cache', default='/tmp/composer_jest_bench')
    p.add_argument('--steps', type=int, nargs='*', default=[100, 300, 600], help='learner checkpoints (JEST steps)')
    p.add_argument('--batches', type=int, default=20, help='super-batches per measurement')
    p.add_argument('--json', default=None)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = le.Settings()
    data = le.build_data(s, Path(args.cache))
    reference = le.train_reference(s, data, Path(args.cache))
    pool = le.TensorPool(data['pool'])
    # the benchmark's jest-0.8 seed-0 run, snapshotted at the requested steps
    snapshots = Snapshots(args.steps)
    learner = le.make_model(s, data['tokenizer'], seed=0)
    algo = JEST(reference=reference['towers'], filter_ratio=0.8, n_chunks=s.n_chunks, seed=0)
    le._fit(learner, le.make_loader(pool, 320, seed=0), s, max(args.steps), 0, [algo], recorder=snapshots)
    results = {}
    for steps, towers in sorted(snapshots.towers.items()):
        for f in (0.8, 0.9):
            res = diagnose(towers, reference['towers'], pool, f, s.batch_size, args.batches,
                           torch.Generator().manual_seed(1234))
            results[f'step {steps}, f={f}'] = res
            print(f'\n### learner after {steps} JEST steps, f = {f} ({args.batches} super-batches, mean ± std)\n')
            print('| quantity | value |\n|---|---:|')
            for k, (m, sd) in res.items():
                print(f'| {k} | {m:.3f} ± {sd:.3f} |')
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == '__main__':
    main()
