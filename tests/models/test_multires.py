"""Multi-resolution training in CLIPModel: a fraction of each training batch is encoded at a larger patch size."""

from __future__ import annotations

import types

import open_clip
import pytest
import torch

from composer_jest.jest.algorithm import JEST
from composer_jest.models.clip import CLIPModel

LOW_PATCH = 16  # jest-tiny: 32 px, native patch 8 -> 2x2 + 1 = 5 tokens at patch 16, 4x4 + 1 = 17 natively


@pytest.fixture
def model() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel('jest-tiny', low_res_fraction=0.5, low_res_patch_size=LOW_PATCH).train()


@pytest.fixture
def batch(model) -> dict:
    gen = torch.Generator().manual_seed(1)
    captions = [f'photo {i}' for i in range(8)]
    return {'image': torch.randn(8, 3, 32, 32, generator=gen), 'text': model.tokenizer(captions)}


def record_token_counts(model: CLIPModel) -> tuple[list[tuple[int, int]], torch.utils.hooks.RemovableHandle]:
    """``(batch, tokens)`` of every sequence group going into the image transformer (batch-first in open_clip 3.x;
    a packed call's groups are read from its layout)."""
    calls: list[tuple[int, int]] = []
    layout = model.towers._image_layout

    def record(_m, args, kwargs, _out):
        mask = kwargs.get('attn_mask', args[1] if len(args) > 1 else None)
        packed = mask is not None and mask.numel() == 0
        calls.extend(layout.groups if packed else [(args[0].shape[0], args[0].shape[1])])

    handle = model.towers.clip.visual.transformer.register_forward_hook(record, with_kwargs=True)
    return calls, handle


def test_train_batch_is_split_by_resolution(model, batch):
    calls, handle = record_token_counts(model)
    out = model(batch)
    handle.remove()
    # First half at patch 16 (5 tokens), second half at the native patch 8 (17 tokens).
    assert calls == [(4, 5), (4, 17)]
    image = batch['image']
    with torch.no_grad():
        low = model.towers.encode_image(image[:4], LOW_PATCH)
        high = model.towers.encode_image(image[4:], None)
    torch.testing.assert_close(out['image_features'][:4], low)
    torch.testing.assert_close(out['image_features'][4:], high)
    # The two parts really differ: the low-res half is not the native encoding.
    with torch.no_grad():
        native_first = model.towers.encode_image(image[:4], None)
    assert not torch.allclose(out['image_features'][:4], native_first, atol=1e-3)
    assert out['text_features'].shape[0] == 8


def test_loss_covers_whole_batch(model, batch):
    out = model(batch)
    loss = model.loss(out, batch)
    reference = open_clip.loss.SigLipLoss()(
        out['image_features'], out['text_features'], out['logit_scale'], out['logit_bias']
    )
    torch.testing.assert_close(loss, reference)
    # Dropping either half changes the loss: both parts are in it.
    half = open_clip.loss.SigLipLoss()(
        out['image_features'][4:], out['text_features'][4:], out['logit_scale'], out['logit_bias']
    )
    assert not torch.isclose(loss, half)


@pytest.mark.parametrize('part', [slice(0, 4), slice(4, 8)], ids=['low_res', 'native'])
def test_gradients_reach_patch_embedding_from_both_parts(model, batch, part):
    out = model(batch)
    # A loss on one part's image features only: the patch embedding must get a gradient through it
    # (for the low-res part, through the pseudo-inverse kernel resize).
    (out['image_features'][part] * out['text_features'][part].detach()).sum().backward()
    grad = model.towers.clip.visual.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_no_split_in_eval_or_when_scoring_at_a_patch_size(model, batch):
    image = batch['image']
    model.eval()
    calls, handle = record_token_counts(model)
    with torch.no_grad():
        out = model(batch)
        evaluated = model.eval_forward(batch)
    assert calls == [(8, 17), (8, 17)]
    torch.testing.assert_close(out['image_features'], model.towers.encode_image(image, None))
    torch.testing.assert_close(evaluated['image_features'], out['image_features'])

    model.train()
    calls.clear()
    with torch.no_grad():
        scored = model(batch, patch_size=LOW_PATCH)  # what JEST's flexi scoring calls
    handle.remove()
    assert calls == [(8, 5)]
    torch.testing.assert_close(scored['image_features'], model.towers.encode_image(image, LOW_PATCH))


def test_native_scoring_by_jest_does_not_split(model, batch):
    """JEST scoring at the native patch size (learner_patch_size=None) must see the whole super-batch at full
    resolution: the multi-resolution split is for the trained batch only (JEST scores in eval mode)."""
    jest = JEST(score='hard_learner', learner_patch_size=None, loss='sigmoid')
    state = types.SimpleNamespace(model=model, precision='fp32', precision_config=None, fsdp_enabled=False)
    calls, handle = record_token_counts(model)
    learner, _ = jest._inputs(state, batch, 'image', 'text')
    handle.remove()
    assert calls == [(8, 17)]
    assert model.training  # restored after scoring
    torch.testing.assert_close(learner['image_features'], model.towers.encode_image(batch['image'], None))


@pytest.mark.parametrize('fraction, n', [(0.9, 4), (0.6, 1)])
def test_rounding_that_leaves_no_native_part(fraction, n):
    """round(f · n) == n (e.g. a microbatch of 1 with f > 0.5): every image is encoded at low resolution."""
    model = CLIPModel('jest-tiny', low_res_fraction=fraction, low_res_patch_size=LOW_PATCH).train()
    batch = {'image': torch.randn(n, 3, 32, 32), 'text': model.tokenizer(['x'] * n)}
    out = model(batch)
    assert out['image_features'].shape[0] == n


@pytest.mark.parametrize('kwargs, field', [
    (dict(low_res_fraction=1.0, low_res_patch_size=16), 'low_res_fraction'),
    (dict(low_res_fraction=-0.1, low_res_patch_size=16), 'low_res_fraction'),
    (dict(low_res_fraction=0.5), 'low_res_patch_size'),
])
def test_invalid_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CLIPModel('jest-tiny', **kwargs)


def test_low_res_fraction_defaults_to_half_with_a_patch_size():
    assert CLIPModel('jest-tiny', low_res_patch_size=16).low_res_fraction == 0.5  # the paper's split
    assert CLIPModel('jest-tiny').low_res_fraction == 0.0
    assert CLIPModel('jest-tiny', low_res_fraction=0.25, low_res_patch_size=16).low_res_fraction == 0.25
