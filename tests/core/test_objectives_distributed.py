"""The objectives' training loss on 2 gloo ranks equals the one-process loss on the concatenated batch.

Each rank holds half the batch; features are all-gathered with their gradients (as open_clip's ``ClipLoss``), the
false-negative ids and the queue's momentum embeddings are all-gathered too. Every rank computes the global loss,
and the ranks' parameter gradients average (DDP) to the one-process gradient.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

SPEC = {'name': 'hcl', 'false_negatives': {'key': 'label'}, 'negatives': {'queue_size': 24, 'momentum': 0.5}}
N = 8  # global batch


def _batch(tokenizer) -> dict:
    g = torch.Generator().manual_seed(0)
    words = ['red', 'green', 'blue', 'circle', 'square', 'star']
    captions = [' '.join(words[int(i)] for i in torch.randint(0, 6, (3,), generator=g)) for _ in range(N)]
    return {'image': torch.randn(N, 3, 32, 32, generator=g), 'text': tokenizer(captions),
            'label': torch.tensor([0, 1, 2, 0, 1, 3, 0, 2])}


def _steps(model, batch: dict) -> dict:
    """Two loss calls (the second sees the queue the first filled); losses, accumulated gradients, queue."""
    losses = []
    for _ in range(2):
        loss = model.loss(model(batch), batch)
        loss.backward()
        losses.append(float(loss))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {'losses': losses, 'grads': grads, 'queue': model.negatives.queue_text.clone(),
            'valid': model.negatives.valid.clone()}


def _model():
    from composer_jest import CLIPModel

    torch.manual_seed(0)
    return CLIPModel('jest-tiny', loss=SPEC)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK='0')
    torch_dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=120))
    try:
        model = _model()
        batch = _batch(model.tokenizer)
        half = slice(rank * N // world, (rank + 1) * N // world)
        torch.save(_steps(model, {k: v[half] for k, v in batch.items()}), os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_worker, args=(world, os.path.join(tmp, 'init'), tmp), nprocs=world,
                                     start_method='spawn', join=False)
        deadline = time.monotonic() + 240
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f'{world} gloo ranks did not finish in 240 s')
        ranks = [torch.load(os.path.join(tmp, f'rank{r}.pt')) for r in range(world)]
    model = _model()
    single = _steps(model, _batch(model.tokenizer))
    assert single['losses'][0] != pytest.approx(single['losses'][1], rel=1e-3)  # the queue changed the loss
    for r in ranks:
        assert r['losses'] == pytest.approx(single['losses'], rel=1e-5)
        assert torch.allclose(r['queue'], single['queue'], atol=1e-6) and torch.equal(r['valid'], single['valid'])
    assert ranks[0]['grads'].keys() == single['grads'].keys()
    for name, grad in single['grads'].items():
        mean = sum(r['grads'][name] for r in ranks) / world  # what DDP's average gives every rank
        assert torch.allclose(mean, grad, atol=1e-5, rtol=1e-4), name
