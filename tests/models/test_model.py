"""The ComposerModel wrapper: open_clip losses, metrics, and learner checkpoints reused as references."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from model_helpers import make_model

from composer_jest import CLIPModel, load_reference
from composer_jest.models.clip import RetrievalRecall, ZeroShotAccuracy


def batch(model: CLIPModel, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return {'image': torch.randn(n, 3, 32, 32, generator=g),
            'text': model.tokenizer([f'a red circle number {i}' for i in range(n)]),
            'label': torch.arange(n) % 6}


@pytest.mark.parametrize('loss', ['sigmoid', 'softmax'])
def test_forward_and_loss_match_open_clip(loss):
    model = make_model(loss=loss)
    b = batch(model)
    out = model(b)
    clip = model.towers.clip
    assert torch.allclose(out['image_features'], F.normalize(clip.encode_image(b['image']), dim=-1), atol=1e-6)
    assert torch.allclose(out['text_features'], F.normalize(clip.encode_text(b['text']), dim=-1), atol=1e-6)
    if loss == 'sigmoid':
        expected = open_clip.loss.SigLipLoss()(out['image_features'], out['text_features'], out['logit_scale'],
                                               out['logit_bias'])
    else:
        expected = open_clip.loss.ClipLoss()(out['image_features'], out['text_features'], out['logit_scale'])
    assert torch.allclose(model.loss(out, b), expected)
    model.loss(out, b).backward()
    assert clip.visual.conv1.weight.grad.abs().sum() > 0 and clip.logit_scale.grad is not None


def test_model_validation():
    with pytest.raises(ValueError,
                       match=r"unknown loss 'hinge'; registered losses: \['dcl', 'distill', 'drrho', 'hcl', 'npair'"):
        CLIPModel('jest-tiny', loss='hinge')
    with pytest.raises(ValueError, match='jest-tiny'):
        CLIPModel('jest-tinny')
    with pytest.raises(ValueError, match='logit bias'):
        CLIPModel({'embed_dim': 16, 'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 32, 'layers': 1,
                                                    'head_width': 16},
                   'text_cfg': {'context_length': 8, 'width': 32, 'heads': 2, 'layers': 1}}, loss='sigmoid')


def test_zero_shot_accuracy_and_retrieval_recall_values():
    acc = ZeroShotAccuracy()
    acc.update(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), torch.tensor([0, 0, 0]))
    assert torch.isclose(acc.compute(), torch.tensor(2 / 3))

    image = torch.eye(4)
    text = torch.eye(4)[[0, 2, 1, 3]]  # images 1 and 2 have their captions swapped
    text[3] = text[0]                   # caption 3 duplicates caption 0
    r1 = RetrievalRecall('image_to_text', 1)
    r1.update(image, text)
    # image 0: text 0 and the duplicate tie -> rank 0 (hit); 1, 2 miss; image 3: its own text ties with text 0
    assert r1.compute() == 0.5
    r2 = RetrievalRecall('image_to_text', 3)
    r2.update(image, text)
    assert r2.compute() == 1.0


def test_eval_forward_produces_class_logits_and_caches_class_features():
    model = make_model().eval()
    b = batch(model)
    out = model.eval_forward(b)
    assert out['class_logits'].shape == (6, 6)
    first = model._class_features
    model.eval_forward(b)
    assert model._class_features is first  # cached during eval
    model.train()
    model(b)
    assert model._class_features is None   # training invalidates it


def test_learner_checkpoint_loads_as_reference(tmp_path):
    from composer import Trainer

    model = make_model(seed=3)
    trainer = Trainer(model=model, max_duration='1ba', save_folder=str(tmp_path), progress_bar=False)
    trainer.save_checkpoint(str(tmp_path / 'learner.pt'))
    reference = load_reference(str(tmp_path / 'learner.pt'), default_model='jest-tiny')
    b = batch(model)
    with torch.no_grad():
        expected, got = model.eval()(b), reference(b['image'], b['text'])
    assert torch.allclose(expected['image_features'], got['image_features'], atol=1e-6)
    assert torch.allclose(expected['text_features'], got['text_features'], atol=1e-6)
    assert not any(p.requires_grad for p in reference.parameters())
    # a module given as reference is copied before freezing: the learner keeps training
    frozen = load_reference(model)
    assert all(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in frozen.parameters())


def test_text_trimming_is_exact_forward_and_backward():
    model = make_model()
    model.towers.double()  # float64: trimming changes only the summation order (float32 was off by 2e-4 here)
    text = model.tokenizer(['a red circle', 'a small blue square near the top left', 'x'])
    assert int(text.argmax(-1).max()) + 1 < text.shape[1]  # there is padding to cut
    clip = model.towers.clip
    trimmed = model.towers.encode_text(text)
    full = clip.encode_text(text)
    torch.testing.assert_close(trimmed, full, atol=1e-12, rtol=1e-12)
    grad_trimmed = torch.autograd.grad(trimmed.square().sum(), clip.token_embedding.weight)[0]
    grad_full = torch.autograd.grad(clip.encode_text(text).square().sum(), clip.token_embedding.weight)[0]
    torch.testing.assert_close(grad_trimmed, grad_full, atol=1e-12, rtol=1e-10)
