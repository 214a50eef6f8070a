"""Cost per step of the reference in the loss (issue 30): a uniform step against the same step with each steered loss.

The rows that train with these losses -- ``drrho``, ``uniform-distill``, ``jest-<f>-all-distill``,
``offline-0.5-then-jest-0.8-all`` -- are methods of the compute study (:mod:`benchmarks.compute_study`, phase
``steering``), run and tabulated there beside uniform, offline filtering and JEST.

The steered losses read the pool's cached reference columns (the same one-off embedding pass as JEST's and offline
filtering's). Their extra work per step -- the reference's ``n x n`` similarities and a few elementwise terms -- is not
added to the study's analytic FLOPs (:func:`loss_flops` gives it; < 0.1% of a step), and it is inside the measured
CPU time. This script times one training step (forward, loss, backward, AdamW) of uniform SigLIP against the same step
with each steered loss, interleaved in one process on the same batches (the <= 5% goal of issue 30).

Example::

    python benchmarks/steering_cost.py --reps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import compute_study as cs  # noqa: E402

from composer_jest.models.clip import CLIPModel  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'steering'
DRRHO, DISTILL = cs.DRRHO, cs.DISTILL


# ---------------------------------------------------------------------------------------------------------------
# micro-benchmark: a uniform step with and without the steered loss
# ---------------------------------------------------------------------------------------------------------------
def loss_flops(n: int, d: int) -> float:
    """Extra FLOPs of a steered loss on ``n`` pairs: the reference's ``n x n`` cosines (``2 n² d``) plus ~30
    elementwise operations per pair (both directions, forward and backward)."""
    return 2.0 * n * n * d + 30.0 * n * n


def micro(reps: int, b: int = 64) -> dict[str, Any]:
    """Median CPU seconds of a training step per loss, interleaved (each rep runs every loss once, in a random order,
    on the same batch), and of the loss alone (forward + backward on fixed features)."""
    s = cs.study_settings()
    cfg = cs.model_config('proportional', s)
    g = torch.Generator().manual_seed(0)
    dim = cfg['embed_dim']
    batch = {'image': torch.randn(b, 3, 32, 32, generator=g),
             'text': torch.randint(1, s.vocab_size - 1, (b, 12), generator=g),
             'ref_image_features': torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).half(),
             'ref_text_features': torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).half(),
             'ref_logit_scale': torch.full((b,), 10.0), 'ref_logit_bias': torch.full((b,), -10.0)}
    batch['text'][:, -1] = s.vocab_size - 1  # EOT last: full-length captions
    losses = {'uniform (sigmoid)': 'sigmoid', 'drrho sigmoid': DRRHO, 'distill sigmoid': DISTILL,
              'drrho softmax + distill': {'name': 'drrho', 'form': 'softmax', 'distill': 1.0},
              'distill softmax': {'name': 'distill', 'form': 'softmax'}}
    models = {}
    for name, loss in losses.items():
        torch.manual_seed(0)  # the same init for every model
        model = CLIPModel(cfg, loss=loss, tokenizer=lambda t: t)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {k: [] for k in losses}
    names = list(models)
    for rep in range(reps + 3):
        for k in torch.randperm(len(names), generator=g).tolist():  # a fresh order every rep
            model, opt = models[names[k]]
            t0 = time.process_time()  # CPU seconds of this process: robust to a shared machine (one torch thread)
            opt.zero_grad(set_to_none=True)
            model.loss(model(batch), batch).backward()
            opt.step()
            if rep >= 3:  # warm-up reps dropped
                times[names[k]].append(time.process_time() - t0)
    base = statistics.median(times['uniform (sigmoid)'])
    return {'batch': b, 'reps': reps, 'threads': torch.get_num_threads(), 'embed_dim': dim, 'clock': 'process CPU',
            'median_s': {k: statistics.median(v) for k, v in times.items()},
            'loss_only_median_s': loss_only(models, batch, reps * 5, g),
            'ratio_to_uniform': {k: statistics.median(v) / base for k, v in times.items()},
            'extra_flops_per_step': loss_flops(b, dim)}


def loss_only(models: dict, batch: dict, reps: int, g: torch.Generator) -> dict[str, float]:
    """Median CPU seconds of each model's loss + its backward on fixed random features (no towers)."""
    b, dim = batch['ref_image_features'].shape
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(reps):
        for name, (model, _opt) in models.items():
            x, y = (torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
                    for _ in range(2))
            out = {'image_features': x, 'text_features': y, 'logit_scale': torch.tensor(10.0, requires_grad=True),
                   'logit_bias': torch.tensor(-10.0, requires_grad=True)}
            t0 = time.process_time()
            model.loss(out, batch).backward()
            times[name].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(RESULTS))
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = micro(args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'micro.json').write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
