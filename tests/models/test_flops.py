"""Analytic FLOP estimates (composer_jest.models.flops) against token scaling, a brute-force count, and the paper's
setting."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import composer_jest  # noqa: F401  (registers the shipped model configs)
from composer_jest.models.clip import CLIPModel
from composer_jest.models.flexi import encode_image_at
from composer_jest.models.flops import (
    patch_resize_flops,
    step_flops,
    text_forward_flops,
    transformer_flops,
    vit_forward_flops,
)
from composer_jest.models.text_buckets import caption_lengths, length_histogram

TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=16, width=64, heads=2, layers=2),
    init_logit_bias=-10.0,
    nonscalar_logit_scale=True,
)


@pytest.fixture(scope='module')
def tiny() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY).train()


@pytest.fixture(scope='module')
def vit_b16() -> open_clip.CLIP:
    """The ViT-B/16 SigLIP-style config, built on the meta device: real module shapes, no memory or init cost."""
    cfg = open_clip.get_model_config('jest-vit-b-16')
    with torch.device('meta'):
        return open_clip.CLIP(**cfg, nonscalar_logit_scale=True)


def counted(fn) -> int:
    """FLOPs ``FlopCounterMode`` sees in ``fn()``.

    The SDPA math backend is forced: on CPU the fused kernel (``_scaled_dot_product_flash_attention_for_cpu``)
    has no FLOP formula registered in torch 2.7 and its ``Q·Kᵀ``/``A·V`` products would go uncounted
    (a systematic gap of ``4·T²·w`` per layer); the math backend runs them as counted ``bmm``s.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_transformer_formula(tiny):
    # 2 layers, w=64, mlp 4w=256, T=17: 8Tw² + 4T²w + 4Twm per layer.
    t, w, m = 17, 64, 256
    assert transformer_flops(tiny.visual.transformer, t) == 2 * (8 * t * w * w + 4 * t * t * w + 4 * t * w * m)


def test_double_patch_quarters_image_flops(tiny, vit_b16):
    # ViT-B/16 at 224 px: 197 -> 50 tokens; ~1/4 of the FLOPs plus a little (class token, projection).
    ratio = vit_forward_flops(vit_b16.visual, 224, 32) / vit_forward_flops(vit_b16.visual, 224, 16)
    assert 0.25 < ratio < 0.27
    # Tiny model at 64 px, patch 8 -> 16: 65 -> 17 tokens. The "+ small" is larger in a 2-layer model: the
    # patch embedding costs 2·H·W·C·w whatever the patch size, and here it is ~9% of the forward.
    ratio = vit_forward_flops(tiny.visual, 64, 16) / vit_forward_flops(tiny.visual, 64, 8)
    assert 17 / 65 < ratio < 0.32
    # Defaults are the native size and patch.
    assert vit_forward_flops(tiny.visual) == vit_forward_flops(tiny.visual, 32, 8)
    # The text tower does not depend on the patch size; it scales with the context length.
    assert text_forward_flops(vit_b16) > 0


@pytest.mark.parametrize('patch_size', [8, 16, 4])
def test_image_flops_match_flop_counter(tiny, patch_size):
    images = torch.randn(3, 3, 32, 32)
    native = patch_size == 8
    brute = counted(lambda: tiny.visual(images) if native else encode_image_at(tiny.visual, images, patch_size))
    analytic = 3 * vit_forward_flops(tiny.visual, 32, patch_size) + patch_resize_flops(tiny.visual, patch_size)
    # Only matmuls/convs are counted by both, so they agree to rounding.
    assert brute == pytest.approx(analytic, rel=0.01)


def test_text_flops_match_flop_counter(tiny):
    text = torch.randint(0, 1000, (3, 16))
    assert counted(lambda: tiny.encode_text(text)) == pytest.approx(3 * text_forward_flops(tiny), rel=0.01)


def test_train_flops_match_flop_counter_with_multires():
    """A real CLIPModel training step (half the batch at patch 16) ≈ step_flops()['train'] (backward ≈ 2x forward)."""
    torch.manual_seed(0)
    model = CLIPModel(dict(TINY), low_res_fraction=0.5, low_res_patch_size=16).train()
    batch = {'image': torch.randn(8, 3, 32, 32), 'text': torch.randint(0, 1000, (8, 16))}

    def step():
        model.loss(model(batch), batch).backward()

    brute = counted(step)
    # Random token ids put each caption's EOT (the argmax) anywhere: the towers encode them in length buckets.
    counts = length_histogram(caption_lengths(batch['text']), 16)
    est = step_flops(model, superbatch=8, subbatch=8, low_res_fraction=0.5, low_res_patch_size=16,
                     text_length_counts=counts)
    # The backward skips the input gradient of the patch embedding, so the brute count is a bit below 3x.
    assert brute == pytest.approx(est['train'], rel=0.1)
    # Multi-resolution makes training cheaper than the full-resolution step on the same batch.
    assert est['train'] < est['uniform_train']


def test_cached_reference_costs_nothing(tiny):
    kwargs = dict(superbatch=40, subbatch=8, learner_patch_size=16)
    cached = step_flops(tiny, reference_cached=True, **kwargs)
    live = step_flops(tiny, reference_cached=False, **kwargs)
    assert cached['reference_scoring'] == 0.0
    per_example = vit_forward_flops(tiny.visual) + text_forward_flops(tiny)
    assert live['reference_scoring'] == pytest.approx(40 * per_example)
    assert live['total'] - cached['total'] == pytest.approx(live['reference_scoring'])
    # Learner scoring: 40 images at patch 16 + 40 captions + one kernel resize.
    expected = 40 * (vit_forward_flops(tiny.visual, 32, 16) + text_forward_flops(tiny))
    assert cached['learner_scoring'] == pytest.approx(expected + patch_resize_flops(tiny.visual, 16))
    # hard_learner: no reference at all, and only one N x N logit matrix.
    no_ref = step_flops(tiny, uses_reference=False, **kwargs)
    assert no_ref['reference_scoring'] == 0.0 and no_ref['selection'] < cached['selection']
    # easy_reference: no learner scoring.
    no_learner = step_flops(tiny, uses_learner=False, **kwargs)
    assert no_learner['learner_scoring'] == 0.0 and no_learner['reference_scoring'] == live['reference_scoring']
    # A different (smaller) reference architecture is the one counted.
    small_ref = open_clip.CLIP(**{**TINY, 'vision_cfg': {**TINY['vision_cfg'], 'layers': 1}})
    smaller = step_flops(tiny, reference_clip=small_ref, **kwargs)
    assert smaller['reference_scoring'] < live['reference_scoring']
    for key, value in cached.items():
        assert isinstance(value, float), key
    assert cached['total'] == pytest.approx(
        cached['train'] + cached['learner_scoring'] + cached['reference_scoring'] + cached['selection']
    )


def test_paper_setting_ratio(vit_b16):
    """f=0.8, learner scored at patch 32, cached reference, half the batch at patch 32 (ViT-B/16, 224 px).

    Counting the image tower only (the paper's accounting) a JEST step costs ≈1.04x a uniform step:
    scoring 5b images at ~¼ cost, forward only (5 · 0.25 / 3 ≈ +0.42), against training half the batch at
    ~¼ cost (-0.375). The text tower gets no FlexiViT saving: the learner must still encode all 5b
    captions (context 64, ~24% of a B/16 forward), which puts the full step at ≈1.43x.
    """
    b = 256
    kwargs = dict(superbatch=5 * b, subbatch=b, learner_patch_size=32, reference_cached=True,
                  low_res_fraction=0.5, low_res_patch_size=32)
    image_only = step_flops(vit_b16, include_text=False, **kwargs)
    assert 1.0 < image_only['ratio'] < 1.1
    assert image_only['ratio'] == pytest.approx(1.044, abs=0.01)
    both = step_flops(vit_b16, **kwargs)
    assert 1.35 < both['ratio'] < 1.5
    # Without the three savings the same f=0.8 step costs 1 + 5/3 (learner) + 5/3 (reference) ≈ 4.3x.
    plain = step_flops(vit_b16, superbatch=5 * b, subbatch=b)
    assert plain['ratio'] == pytest.approx(1 + 10 / 3, rel=0.02)


def test_non_vit_and_bad_arguments(tiny):
    with torch.device('meta'):
        resnet = open_clip.CLIP(32, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=16),
                                text_cfg=TINY['text_cfg'])
    with pytest.raises(NotImplementedError, match='ViT'):
        vit_forward_flops(resnet.visual)
    with pytest.raises(NotImplementedError, match='ViT'):
        step_flops(resnet, superbatch=8, subbatch=4)
    with pytest.raises(NotImplementedError, match='text tower'):
        text_forward_flops(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='patch_size'):
        vit_forward_flops(tiny.visual, 32, 5)
    with pytest.raises(ValueError, match='low_res_patch_size'):
        step_flops(tiny, superbatch=8, subbatch=4, low_res_fraction=0.5)
    with pytest.raises(ValueError, match='subbatch'):
        step_flops(tiny, superbatch=4, subbatch=8)
