"""The model contract (composer_jest.core.contract.ScoringModel): JEST trains any ComposerModel that implements it."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerModel
from torch import nn
from torch.utils.data import DataLoader

from composer_jest import JEST
from composer_jest.core.contract import ScoringModel


class BagOfWordsCLIP(ComposerModel):
    """Not open_clip: a linear image tower on flattened pixels and a mean-of-embeddings text tower."""

    loss_name = 'sigmoid'
    spec = None

    def __init__(self, dim: int = 16):
        super().__init__()
        self.image = nn.Linear(3 * 8 * 8, dim)
        self.text = nn.EmbeddingBag(100, dim)
        self.logit_scale = nn.Parameter(torch.tensor([10.0]))
        self.logit_bias = nn.Parameter(torch.tensor([-5.0]))
        self.scored_patch_sizes: list[Optional[int]] = []

    def forward(self, batch: dict) -> dict[str, Any]:
        return {'image_features': F.normalize(self.image(batch['image'].flatten(1)), dim=-1),
                'text_features': F.normalize(self.text(batch['text']), dim=-1),
                'logit_scale': self.logit_scale.exp(), 'logit_bias': self.logit_bias.clone()}

    def loss(self, outputs: dict, batch: Any, *args, **kwargs) -> torch.Tensor:
        logits = outputs['logit_scale'] * outputs['image_features'] @ outputs['text_features'].T + outputs['logit_bias']
        labels = 2 * torch.eye(len(logits)) - 1
        return -F.logsigmoid(labels * logits).sum() / len(logits)

    # -- the contract --
    def score_features(self, batch: dict, patch_size: Optional[int] = None) -> dict:
        self.scored_patch_sizes.append(patch_size)
        was_training = self.training
        self.eval()
        try:
            return self(batch)
        finally:
            self.train(was_training)

    def check_scoring_patch_size(self, patch_size: Optional[int]) -> None:
        if patch_size is not None:
            raise ValueError(f'learner_patch_size={patch_size!r}: this model has no patches; valid: [None]')

    def step_flops(self, **kwargs: Any) -> Optional[dict[str, float]]:
        return None


def _batches(n_batches: int, size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    samples = [{'image': torch.randn(3, 8, 8, generator=g), 'text': torch.randint(0, 100, (5,), generator=g),
                'index': torch.tensor(i)} for i in range(n_batches * size)]
    return DataLoader(samples, batch_size=size)


def test_a_model_that_is_not_open_clip_trains_with_jest():
    model = BagOfWordsCLIP()
    assert isinstance(model, ScoringModel)
    jest = JEST(score='hard_learner', filter_ratio=0.75, n_chunks=2, seed=0)
    loader = _batches(3, 16)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='3ba', algorithms=[jest],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), progress_bar=False,
                      log_to_console=False, device='cpu')
    trainer.fit()
    assert model.scored_patch_sizes == [None, None, None]  # JEST went through score_features, every step
    assert jest.examples_seen == 48 and jest.examples_trained == 12
    assert trainer.state.device_train_microbatch_size == 4 and jest.last_indices.numel() == 4


def test_a_model_without_the_contract_is_named_at_fit_start():
    class Plain(ComposerModel):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def forward(self, batch):
            return self.layer(batch['image'])

        def loss(self, outputs, batch, *args, **kwargs):
            return outputs.sum()

    plain = Plain()
    trainer = Trainer(model=plain, train_dataloader=DataLoader([{'image': torch.randn(2)}] * 4, batch_size=4),
                      max_duration='1ba', algorithms=[JEST(score='hard_learner', filter_ratio=0.5)],
                      optimizers=torch.optim.SGD(plain.parameters(), lr=0.1), progress_bar=False,
                      log_to_console=False, device='cpu')
    with pytest.raises(TypeError, match=r"Plain lacks \['loss_name', 'spec', 'score_features', "
                                        r"'check_scoring_patch_size', 'step_flops'\]"):
        trainer.fit()


def test_the_contract_checks_the_scoring_patch_size_at_fit_start():
    model = BagOfWordsCLIP()
    trainer = Trainer(model=model, train_dataloader=_batches(1, 8), max_duration='1ba',
                      algorithms=[JEST(score='hard_learner', filter_ratio=0.5, learner_patch_size=4)],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), progress_bar=False,
                      log_to_console=False, device='cpu')
    with pytest.raises(ValueError, match='learner_patch_size=4: this model has no patches'):
        trainer.fit()
