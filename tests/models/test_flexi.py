"""Tests for composer_jest.models.flexi (FlexiViT forward of open_clip's VisionTransformer)."""

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import nn

from composer_jest.models import flexi
from composer_jest.models.flexi import (
    check_patch_size,
    encode_image_at,
    pinv_resize_matrix,
    resize_matrix,
    resize_patch_embed,
    valid_patch_sizes,
)


def _tiny_clip(seed: int = 0, **vision_overrides) -> open_clip.CLIP:
    torch.manual_seed(seed)  # test determinism only; the library uses no global RNG
    vision_cfg = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
    vision_cfg.update(vision_overrides)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=vision_cfg,
        text_cfg=dict(context_length=16, width=64, heads=2, layers=2),
        init_logit_bias=-10.0,
        nonscalar_logit_scale=True,
    )
    return model.eval()


@pytest.fixture(scope='module')
def clip() -> open_clip.CLIP:
    return _tiny_clip()


@pytest.fixture
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=gen)


def _patchwise_resize(image: torch.Tensor, p_old: int, p_new: int) -> torch.Tensor:
    """Resize every non-overlapping p_old patch on its own to p_new (exactly the resize behind B)."""
    b, c, h, w = image.shape
    gh, gw = h // p_old, w // p_old
    patches = image.reshape(b, c, gh, p_old, gw, p_old).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p_old, p_old)
    patches = F.interpolate(patches, size=(p_new, p_new), mode='bicubic', antialias=True, align_corners=False)
    patches = patches.reshape(b, gh, gw, c, p_new, p_new).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, gh * p_new, gw * p_new)


def test_native_patch_size_is_exactly_visual(clip, images):
    with torch.no_grad():
        expected = clip.visual(images)
        assert torch.equal(encode_image_at(clip.visual, images, None), expected)
        assert torch.equal(encode_image_at(clip.visual, images, 8), expected)
        assert torch.equal(encode_image_at(clip.visual, images, 8), clip.encode_image(images))
        # The functional path itself (bypassing the shortcut) reproduces open_clip's forward.
        torch.testing.assert_close(flexi._vit_forward(clip.visual, images, 8), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    'overrides',
    [
        dict(pool_type='avg'),
        dict(final_ln_after_pool=True),
        dict(no_ln_pre=True, ls_init_value=0.1),
        dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2, pool_type='avg'),
        # open_clip's WIP 'parallel'/'cascade' pools only run when output_dim == width (ln_post is sized output_dim).
        dict(attentional_pool='parallel', attn_pooler_queries=4, attn_pooler_heads=2, output_dim=64),
        dict(attentional_pool='cascade', attn_pooler_queries=4, attn_pooler_heads=2, output_dim=64),
        dict(pos_embed_type='sin_cos_2d'),
        dict(output_tokens=True),
    ],
)
def test_functional_forward_matches_visual_across_configs(overrides, images):
    torch.manual_seed(8)
    kwargs = dict(image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_ratio=2.0, output_dim=32)
    visual = open_clip.transformer.VisionTransformer(**{**kwargs, **overrides}).eval()
    with torch.no_grad():
        expected = visual(images)
        got = flexi._vit_forward(visual, images, 8)
        low = encode_image_at(visual, images, 16)
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == 2
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
        assert low[0].shape == expected[0].shape and low[1].shape[1] == 4  # (32/16)² patch tokens
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert low.shape == expected.shape and torch.isfinite(low).all()


def test_resize_matrix_is_the_interpolation():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    b = resize_matrix((8, 8), (16, 16), 'cpu', torch.float32)
    assert b.shape == (256, 64)
    expected = F.interpolate(x, size=(16, 16), mode='bicubic', antialias=True, align_corners=False)
    torch.testing.assert_close(x.reshape(5, 64) @ b.T, expected.reshape(5, 256), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('new', [4, 12, 16])
def test_resize_patch_embed_matches_timm(clip, new):
    weight = clip.visual.conv1.weight.detach()
    ours = resize_patch_embed(weight, new)
    assert ours.shape == (64, 3, new, new)
    torch.testing.assert_close(ours, resample_patch_embed(weight, [new, new]), rtol=1e-4, atol=1e-5)


def test_pseudo_inverse_property_on_upsampled_patches(clip, images):
    """<x, w> == <resize(x), ŵ>: tokens of an image at patch 8 equal those of its 2x patch-wise upsample at 16."""
    weight = clip.visual.conv1.weight.detach()
    up = _patchwise_resize(images, 8, 16)  # (3, 3, 64, 64)
    with torch.no_grad():
        tokens_native = clip.visual.conv1(images)
        tokens_up = F.conv2d(up, resize_patch_embed(weight, 16), stride=16)
    assert tokens_up.shape == tokens_native.shape == (3, 64, 4, 4)
    torch.testing.assert_close(tokens_up, tokens_native, rtol=1e-4, atol=1e-4)
    # A different kernel (e.g. plain bilinear resize of the weights / 4) would not satisfy it.
    naive = F.interpolate(weight, size=(16, 16), mode='bilinear', align_corners=False) / 4
    assert not torch.allclose(F.conv2d(up, naive, stride=16), tokens_native, rtol=1e-4, atol=1e-4)

    # Same property for a single random patch, via the matrix directly (non-square sizes too).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6 * 5, generator=gen, dtype=torch.float64)
    w = torch.randn(6 * 5, generator=gen, dtype=torch.float64)
    b = resize_matrix((6, 5), (12, 9), 'cpu', torch.float64)
    w_hat = pinv_resize_matrix((6, 5), (12, 9), 'cpu', torch.float64).T @ w
    torch.testing.assert_close(torch.dot(b @ x, w_hat), torch.dot(x, w))


def test_coarser_patch_forward(clip, images):
    seen = []
    handle = clip.visual.transformer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        with torch.no_grad():
            native = encode_image_at(clip.visual, images, 8)
            low = encode_image_at(clip.visual, images, 16)
            finer = encode_image_at(clip.visual, images, 4)
    finally:
        handle.remove()
    assert [s[1] for s in seen] == [(32 // 8) ** 2 + 1, (32 // 16) ** 2 + 1, (32 // 4) ** 2 + 1]  # 17, 5, 65
    for out in (low, finer):
        assert out.shape == native.shape
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, native)


def test_gradients_reach_original_parameters_without_mutation(images):
    model = _tiny_clip(seed=4).train()
    visual = model.visual
    before = {name: p.detach().clone() for name, p in visual.named_parameters()}
    conv_shape = visual.conv1.weight.shape
    encode_image_at(visual, images, 16).pow(2).sum().backward()
    for name in (
        'conv1.weight',
        'positional_embedding',
        'class_embedding',
        'proj',
        'transformer.resblocks.0.attn.in_proj_weight',
        'transformer.resblocks.1.mlp.c_fc.weight',
    ):
        grad = dict(visual.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert visual.conv1.weight.shape == conv_shape
    assert visual.conv1.stride == (8, 8)
    assert visual.positional_embedding.shape == (17, 64)
    for name, p in visual.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_gradient_of_resize_is_the_linear_map():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    (resize_patch_embed(weight, 16) * upstream).sum().backward()
    pinv = pinv_resize_matrix((8, 8), (16, 16), 'cpu', torch.float64)
    torch.testing.assert_close(weight.grad, (upstream.reshape(2, 3, 256) @ pinv.T).reshape(2, 3, 8, 8))


def test_resize_matrix_is_cached(clip, images):
    flexi._MATRIX_CACHE.clear()
    with torch.no_grad():
        encode_image_at(clip.visual, images, 16)
        n_entries = len(flexi._MATRIX_CACHE)
        pinv = pinv_resize_matrix((8, 8), (16, 16), clip.visual.conv1.weight.device, torch.float32)
        encode_image_at(clip.visual, images, 16)
    assert n_entries == 2  # B and pinv(B) for 8 -> 16
    assert len(flexi._MATRIX_CACHE) == n_entries
    assert pinv_resize_matrix((8, 8), (16, 16), 'cpu', torch.float32) is pinv
    assert resize_matrix((8, 8), (16, 16), 'cpu', torch.float32) is resize_matrix((8, 8), (16, 16), 'cpu')
    # Built under inference_mode, the cached matrix must still be usable with autograd afterwards.
    flexi._MATRIX_CACHE.clear()
    with torch.inference_mode():
        encode_image_at(clip.visual, images, 4)
    weight = clip.visual.conv1.weight.detach().clone().requires_grad_(True)
    resize_patch_embed(weight, 4).sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize('bad', [5, 3, 64, 0, -8])
def test_invalid_patch_size_raises(clip, images, bad):
    with pytest.raises(ValueError, match='patch_size') as info:
        encode_image_at(clip.visual, images, bad)
    assert '[1, 2, 4, 8, 16, 32]' in str(info.value)


def test_valid_patch_sizes():
    assert valid_patch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert valid_patch_sizes((24, 36)) == [1, 2, 3, 4, 6, 12]


class _TinyConvTower(nn.Module):
    """Stand-in for a non-ViT image tower (conv + global pool + linear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(-2, -1)))


def test_non_vit_fallback_downscales_and_warns_once(monkeypatch, images):
    monkeypatch.setattr(flexi, '_warned_non_vit', False)
    torch.manual_seed(6)
    tower = _TinyConvTower()
    shapes = []
    tower.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    with pytest.warns(UserWarning, match='not a ViT'):
        out = encode_image_at(tower, images, 32)  # 32 relative to the nominal 16: half resolution
    assert out.shape == (3, 4)
    assert shapes[-1] == (3, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        encode_image_at(tower, images, 8, native_patch_size=8)  # native: the image itself
        assert shapes[-1] == (3, 3, 32, 32)
        encode_image_at(tower, images, 64)  # warns only once per process
        assert shapes[-1] == (3, 3, 8, 8)
        assert torch.equal(encode_image_at(tower, images, None), tower(images))


def test_modified_resnet_tower_is_not_vit(monkeypatch):
    monkeypatch.setattr(flexi, '_warned_non_vit', False)
    torch.manual_seed(7)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16, head_width=16),
        text_cfg=dict(context_length=16, width=32, heads=2, layers=1),
    ).eval()
    assert isinstance(model.visual, open_clip.modified_resnet.ModifiedResNet)
    image = torch.randn(2, 3, 64, 64)
    # ModifiedResNet's attention pool has a fixed-size positional embedding: no cheap resolution, a clear error.
    with torch.no_grad(), pytest.raises(ValueError, match='needs a ViT image tower'):
        encode_image_at(model.visual, image, 32)
    with pytest.raises(ValueError, match='learner_patch_size=32 needs a ViT'):
        check_patch_size(model.visual, 32, 'learner_patch_size')
    check_patch_size(model.visual, None)  # full resolution is always fine
    assert torch.equal(encode_image_at(model.visual, image, None), model.visual(image))


def test_check_patch_size_lists_valid_sizes():
    vit = open_clip.CLIP(16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
                         text_cfg=dict(context_length=16, width=32, heads=2, layers=1)).visual
    check_patch_size(vit, 16)
    with pytest.raises(ValueError, match=r'learner_patch_size=12 does not tile a 32x32 image; '
                                         r'valid patch sizes are \[1, 2, 4, 8, 16, 32\]'):
        check_patch_size(vit, 12, 'learner_patch_size')
