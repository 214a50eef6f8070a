"""Checkpoints saved before the package was split into layers still resume.

``tests/fixtures/jest_67c44c4.ckpt`` was written by the code at commit 67c44c4 (flat ``composer_jest/*.py``) with
``tests/fixtures/make_checkpoint_67c44c4.py``: 3 steps of JEST on a ~0.45 M-parameter CLIP; the JSON beside it
holds what that run ended with (JEST's counters, the sampler generator's next value, the logit scale). Today's
code, with JEST passed to the Trainer, must load the weights and JEST's counters and generator, and train on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from composer import Trainer
from composer.optim import DecoupledSGDW
from fixtures.make_checkpoint_67c44c4 import SAMPLES, SETTINGS, STEPS, SUPERBATCH, TINY

from composer_jest import JEST, CLIPModel, jest_first
from composer_jest.data import shapes_dataloader
from composer_jest.models.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parents[1] / 'fixtures'
CHECKPOINT = FIXTURES / 'jest_67c44c4.ckpt'


def test_a_checkpoint_saved_at_67c44c4_resumes_with_todays_code():
    torch.set_num_threads(1)
    expected = json.loads((FIXTURES / 'jest_67c44c4.json').read_text())
    saved = load_checkpoint(CHECKPOINT)  # the safe loader a yaml run's load_path goes through accepts it
    weights = saved['state']['model']
    torch.manual_seed(123)  # other initial weights than the saved run's: the load must overwrite them
    model, reference = CLIPModel(TINY), CLIPModel(TINY)
    jest = JEST(reference=reference, **SETTINGS)
    loader = shapes_dataloader(model.tokenizer, num_samples=SAMPLES, batch_size=SUPERBATCH, noise=0.5, seed=0)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{STEPS + 1}ba',
                      optimizers=DecoupledSGDW(model.parameters(), lr=0.1), algorithms=[jest],
                      algorithm_passes=[jest_first], load_path=str(CHECKPOINT), seed=0, progress_bar=False,
                      log_to_console=False, device='cpu')
    state = model.state_dict()
    assert sorted(state) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(state[key], value), key
    assert float(model.towers.clip.logit_scale.reshape(-1)[0]) == expected['logit_scale']
    assert (jest.examples_seen, jest.examples_trained) == (expected['examples_seen'], expected['examples_trained'])
    pending = torch.Generator()
    pending.set_state(jest._pending_rng)  # restored into the sampler's generator at FIT_START
    assert int(torch.randint(0, 2**31, (1,), generator=pending)) == expected['next_draw']
    assert int(trainer.state.timestamp.batch) == STEPS
    trainer.fit()  # one more step on the loaded state
    assert int(trainer.state.timestamp.batch) == STEPS + 1
    assert jest.examples_seen == expected['examples_seen'] + SUPERBATCH
    assert jest.examples_trained == expected['examples_trained'] + SUPERBATCH // 2
    trainer.close()
