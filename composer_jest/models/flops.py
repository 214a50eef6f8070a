"""Analytic FLOP estimates of a JEST training step for an open_clip CLIP (ViT image tower, text transformer).

Conventions (the usual transformer accounting, e.g. Kaplan et al. 2020):

* a multiply-add counts as **2 FLOPs**; only matrix products are counted (patch embedding, QKV/out
  projections, the two attention products, the MLP, the output projections, the contrastive logits).
  LayerNorm, softmax, GELU, residual adds, biases and the embedding lookup are left out: they are
  ``O(T·w)`` per layer against ``O(T·w²)`` for the matmuls (< 1% for ViT-B), and
  ``torch.utils.flop_counter.FlopCounterMode`` leaves them out too, so the two agree.
* a transformer layer of width ``w``, MLP width ``m`` on ``T`` tokens costs
  ``8·T·w²`` (QKV + output projection, ``4·T·w²`` multiply-adds) ``+ 4·T²·w`` (``Q·Kᵀ`` and
  ``A·V``, ``2·T²·w`` each) ``+ 4·T·w·m`` (MLP up and down, ``2·T·w·m`` each).
  Causal text attention is counted in full (dense kernels compute the masked half too).
* a ViT on an ``H x W`` image at patch ``p`` has ``T = (H/p)·(W/p) + 1`` tokens (class token): patches
  twice as large give ~¼ of the image FLOPs (a bit more: the class token and the ``T²`` term shrink
  slower, and the projections do not shrink).
* backward ≈ 2× forward, so a training step on a batch costs ≈ 3× its forward.

The numbers are read off the modules (``visual.conv1``, ``transformer.width``, ``resblocks[i].mlp.c_fc``,
``context_length``...), never from config names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from composer_jest.core.scoring import selection_flops
from composer_jest.models.text_buckets import (
    DEFAULT_TEXT_BUCKET_OVERHEAD,
    DEFAULT_TEXT_BUCKETS,
    bucket_plan,
    caption_lengths,
    length_histogram,
)

__all__ = [
    'transformer_flops',
    'vit_forward_flops',
    'text_forward_flops',
    'patch_resize_flops',
    'logits_flops',
    'bucketed_text_flops',
    'step_flops',
    'StepFlopMeter',
]

Size = Union[int, tuple[int, int]]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _unwrap_clip(model: nn.Module) -> nn.Module:
    """The open_clip model inside a ``CLIPModel`` / ``CLIPTowers`` / ``torch.compile`` wrapper."""
    for attr in ('_orig_mod', 'module', 'towers', 'clip'):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap_clip(inner)
    return model


def _linear_out_features(module: nn.Module, what: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    raise NotImplementedError(f'{what}: expected an nn.Linear, got {type(module).__name__}')


def transformer_flops(transformer: nn.Module, tokens: int) -> float:
    """Forward FLOPs of an open_clip ``Transformer`` on one sequence of ``tokens`` tokens.

    Args:
        transformer: ``open_clip.transformer.Transformer`` (or ``CustomTransformer``): needs ``width``
            and ``resblocks`` whose MLP is ``mlp.c_fc``/``mlp.c_proj`` linears.
        tokens: sequence length ``T``.

    Returns:
        ``Σ_layers 8·T·w² + 4·T²·w + 4·T·w·m`` with ``m`` each block's MLP hidden width.

    Raises:
        NotImplementedError: a block without the standard attention/MLP layout (e.g. SwiGLU).
    """
    width = getattr(transformer, 'width', None)
    blocks = getattr(transformer, 'resblocks', None)
    if width is None or blocks is None:
        raise NotImplementedError(
            f'{type(transformer).__name__} is not an open_clip Transformer (needs .width and .resblocks)'
        )
    t, w = float(tokens), float(width)
    total = 0.0
    for i, block in enumerate(blocks):
        mlp = getattr(block, 'mlp', None)
        c_fc = getattr(mlp, 'c_fc', None) if mlp is not None else None
        if c_fc is None or not hasattr(block, 'attn'):
            raise NotImplementedError(
                f'resblock {i} ({type(block).__name__}) lacks the attn + mlp.c_fc layout FLOP counting assumes'
            )
        m = float(_linear_out_features(c_fc, f'resblock {i} mlp.c_fc'))
        total += 8 * t * w * w  # Q, K, V and output projections: 4 (T x w) @ (w x w) products
        total += 4 * t * t * w  # Q Kᵀ and A V over all heads: 2 (T x T x w) products
        total += 4 * t * w * m  # MLP: (T x w) @ (w x m) and (T x m) @ (m x w)
    return total


def _check_vit(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f'FLOP estimates support open_clip ViT image towers only, got {type(visual).__name__} '
            '(ResNet/timm towers have no patch size or token count to scale)'
        )
    if getattr(visual, 'attn_pool', None) is not None:
        raise NotImplementedError('FLOP estimates do not cover ViTs with an attentional pooler (CoCa-style)')
    conv = visual.conv1
    if tuple(conv.stride) != tuple(conv.kernel_size) or conv.groups != 1:
        raise NotImplementedError('FLOP estimates need a non-overlapping, ungrouped patch embedding (stride == kernel)')


def _visual(model: nn.Module) -> nn.Module:
    """The image tower: ``model`` itself if it is one, else ``clip.visual`` of a (wrapped) CLIP; checked."""
    model = getattr(model, '_orig_mod', model)
    if not hasattr(model, 'conv1'):
        model = getattr(_unwrap_clip(model), 'visual', model)
        model = getattr(model, '_orig_mod', model)
    _check_vit(model)
    return model


def vit_forward_flops(visual: nn.Module, image_size: Optional[Size] = None, patch_size: Optional[int] = None) -> float:
    """Forward FLOPs of an open_clip ViT image tower for **one** image.

    Args:
        visual: ``clip.visual`` (an ``open_clip.transformer.VisionTransformer``), or a CLIP / ``CLIPModel``.
        image_size: input size (int or ``(H, W)``); ``None`` = the tower's own ``image_size``.
        patch_size: patch size the image is encoded at (FlexiViT); ``None`` = the native patch size.

    Returns:
        Patch embedding ``2·n_patches·(C·p²)·w`` + transformer layers on ``T = n_patches + 1`` tokens +
        output projection ``2·w·d`` (on the pooled token; on every token for ``pool_type='none'``).
        The per-call FlexiViT kernel resize is not per image: see :func:`patch_resize_flops`.

    Raises:
        NotImplementedError: not a ViT tower, or one with an attentional pooler.
        ValueError: ``patch_size`` does not tile the image.
    """
    visual = _visual(visual)
    height, width = _pair(image_size if image_size is not None else visual.image_size)
    p = patch_size if patch_size is not None else _pair(visual.patch_size)[0]
    if height % p or width % p:
        raise ValueError(f'patch_size={p} does not tile a {height}x{width} image')
    conv = visual.conv1
    w = float(conv.out_channels)
    n_patches = (height // p) * (width // p)
    tokens = n_patches + 1  # + class token
    flops = 2 * n_patches * (conv.in_channels * p * p) * w  # patch embedding: a (n, C·p²) @ (C·p², w) matmul
    flops += transformer_flops(visual.transformer, tokens)
    if visual.proj is not None:
        pooled_tokens = tokens if getattr(visual, 'pool_type', 'tok') == 'none' else 1
        flops += 2 * pooled_tokens * w * _proj_dim(visual)
    return float(flops)


def patch_resize_flops(visual: nn.Module, patch_size: Optional[int]) -> float:
    """FLOPs of one FlexiViT pseudo-inverse kernel resize (once per forward call, not per image).

    ``ŵ = w @ pinv(B)`` for the ``(w·C, p_old²)`` kernel and the ``(p_old², p_new²)`` cached matrix; 0 at
    the native patch size.
    """
    visual = _visual(visual)
    native = _pair(visual.patch_size)[0]
    if patch_size is None or patch_size == native:
        return 0.0
    conv = visual.conv1
    return float(2 * conv.out_channels * conv.in_channels * native * native * patch_size * patch_size)


def _text_parts(model: nn.Module) -> tuple[nn.Module, int, Optional[int], str]:
    """``(transformer, tokens, projection output dim or None, pool type)`` of a text tower or CLIP."""
    from open_clip.transformer import TextTransformer

    model = _unwrap_clip(model)
    text = getattr(model, 'text', None)
    if text is not None and not isinstance(text, TextTransformer):  # CustomTextCLIP with an HF tower
        raise NotImplementedError(
            f'FLOP estimates support open_clip TextTransformer text towers only, got {type(text).__name__}'
        )
    tower = text if text is not None else model
    transformer = getattr(tower, 'transformer', None)
    if transformer is None or not hasattr(tower, 'token_embedding'):
        raise NotImplementedError(
            f'{type(tower).__name__} is not an open_clip text tower (needs .transformer and .token_embedding)'
        )
    # TextTransformer.num_pos counts an appended class token; a CLIP's text runs on context_length tokens.
    tokens = int(getattr(tower, 'num_pos', None) or tower.context_length)
    proj = getattr(tower, 'text_projection', None)
    if proj is None:
        out_dim = None
    elif isinstance(proj, nn.Linear):
        out_dim = proj.out_features
    else:
        out_dim = int(proj.shape[-1])
    pool = getattr(tower, 'text_pool_type', None) or getattr(tower, 'pool_type', 'argmax')
    return transformer, tokens, out_dim, pool


def text_forward_flops(text_tower_or_clip: nn.Module, tokens: Optional[int] = None) -> float:
    """Forward FLOPs of an open_clip text tower for **one** caption (``context_length`` tokens).

    Args:
        text_tower_or_clip: an ``open_clip.CLIP`` (text transformer inline), a ``TextTransformer``,
            a ``CustomTextCLIP`` with one, or a ``CLIPModel`` / ``CLIPTowers`` wrapping either.

        tokens: positions actually encoded (``CLIPTowers.encode_text`` trims the padding after the
            batch's longest caption); ``None``: the full context.

    Returns:
        Transformer layers on ``tokens`` positions + text projection ``2·w·d`` on the pooled token.

    Raises:
        NotImplementedError: a Hugging Face or otherwise non-open_clip text tower.
    """
    transformer, context, out_dim, pool = _text_parts(text_tower_or_clip)
    tokens = context if tokens is None else min(int(tokens), context)
    flops = transformer_flops(transformer, tokens)
    if out_dim is not None:
        pooled_tokens = tokens if pool == 'none' else 1
        flops += 2 * pooled_tokens * transformer.width * out_dim
    return float(flops)


def bucketed_text_flops(text_tower_or_clip: nn.Module, length_counts: Sequence[int],
                        text_buckets: int = DEFAULT_TEXT_BUCKETS,
                        text_bucket_overhead: float = DEFAULT_TEXT_BUCKET_OVERHEAD) -> float:
    """Forward FLOPs of encoding a batch of captions in length buckets, as ``CLIPTowers.encode_text`` does.

    Args:
        text_tower_or_clip: as for :func:`text_forward_flops`.
        length_counts: ``counts[ℓ]`` captions needing ``ℓ`` positions (through their end-of-text token), e.g.
            ``text_buckets.length_histogram(text_buckets.caption_lengths(tokens), context)``.
        text_buckets: the most buckets (``CLIPTowers.text_buckets``); ``1`` = one trim to the longest caption.
        text_bucket_overhead: ``CLIPTowers.text_bucket_overhead`` (positions one more bucket must save).

    Returns:
        ``Σ_g n_g · text_forward_flops(L_g)`` over :func:`composer_jest.models.text_buckets.bucket_plan`.
    """
    return float(sum(n * text_forward_flops(text_tower_or_clip, length)
                     for length, n in bucket_plan(length_counts, text_buckets, text_bucket_overhead)))


def _proj_dim(visual: nn.Module) -> int:
    # ``output_dim`` is a plain int, still right when FSDP has flattened or sharded ``proj``.
    dim = getattr(visual, 'output_dim', None)
    return int(dim) if dim is not None else int(visual.proj.shape[-1])


def _embed_dim(clip: nn.Module) -> int:
    visual = clip.visual
    if getattr(visual, 'proj', None) is not None:
        return _proj_dim(visual)
    return int(visual.conv1.out_channels)


def logits_flops(n: int, embed_dim: int) -> float:
    """FLOPs of the ``n x n`` contrastive logit matrix ``X Yᵀ`` of ``embed_dim`` features: ``2·n²·d``."""
    return float(2 * n * n * embed_dim)


def step_flops(
    clip: nn.Module,
    *,
    superbatch: int,
    subbatch: int,
    learner_patch_size: Optional[int] = None,
    image_size: Optional[Size] = None,
    reference_cached: bool = False,
    reference_clip: Optional[nn.Module] = None,
    low_res_fraction: float = 0.0,
    low_res_patch_size: Optional[int] = None,
    include_text: bool = True,
    uses_reference: bool = True,
    uses_learner: bool = True,
    text_tokens: Optional[int] = None,
    text_length_counts: Optional[Sequence[int]] = None,
    text_buckets: int = DEFAULT_TEXT_BUCKETS,
    text_bucket_overhead: float = DEFAULT_TEXT_BUCKET_OVERHEAD,
) -> dict[str, float]:
    """Analytic FLOPs of one JEST step (one rank's super-batch), split by where they go.

    Args:
        clip: the learner: an open_clip CLIP (or ``CLIPModel``/``CLIPTowers``) with a ViT image tower.
        superbatch: ``N``, examples scored per step.
        subbatch: ``b``, examples trained on per step (``N = b`` and no scoring models = uniform).
        learner_patch_size: patch size the learner scores the super-batch at; ``None`` = native.
        image_size: input size; ``None`` = the learner's ``visual.image_size``.
        reference_cached: reference features are read from the batch (precomputed): no reference forward.
        reference_clip: the reference's architecture; ``None`` = same as the learner. Scored at its
            native patch size (what ``JEST`` does).
        low_res_fraction: multi-resolution training: ``round(fraction · b)`` images are encoded at
            ``low_res_patch_size``, the rest at the native patch size (as ``CLIPModel.forward``).
        low_res_patch_size: patch size of the low-resolution part (required when the fraction is > 0).
        include_text: count the text towers. The paper's cost discussion (and the ≈1.04x figure) counts
            the image tower only; pass ``False`` to reproduce it.
        uses_reference: ``False`` for scores without a reference (``hard_learner``): no reference cost.
        uses_learner: ``False`` for scores without the learner (``easy_reference``): no learner scoring.
        text_tokens: caption positions encoded for every caption; ``None``: the full context length
            (or ``text_length_counts``).
        text_length_counts: the super-batch's caption-length histogram (``counts[ℓ]``, see
            :func:`bucketed_text_flops`): captions are then costed as ``CLIPTowers.encode_text`` runs them, in
            length buckets. Scoring encodes the ``N`` captions of the histogram; the trained ``b`` are costed
            as a batch with the super-batch's length distribution (the histogram scaled by ``b / N``: fewer
            captions get fewer buckets when a bucket has an overhead). Exclusive with ``text_tokens``.
        text_buckets, text_bucket_overhead: the bucket plan's settings (``CLIPTowers``'s attributes).

    Returns:
        Dict of FLOPs: ``train`` (≈ 3x the sub-batch forward, incl. the ``b x b`` loss logits),
        ``learner_scoring`` (no-grad forward of the ``N`` super-batch at ``learner_patch_size``),
        ``reference_scoring`` (0 when cached or unused), ``selection`` (the blockwise conditional
        updates, ``4·N·b·d`` per scoring model, local scope: ``scoring.selection_flops``), ``total`` (their
        sum), ``uniform_train`` (a plain step on ``b`` examples at full resolution) and ``ratio``
        (``total / uniform_train``). For a step without selection use ``uniform_train`` (or ``train`` for
        uniform multi-resolution training).

    Raises:
        ValueError: inconsistent sizes or multi-resolution settings.
        NotImplementedError: a non-ViT image tower or non-open_clip text tower.

    Example:
        >>> import open_clip
        >>> clip = open_clip.CLIP(64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2),
        ...                       text_cfg=dict(context_length=16, width=64, heads=2, layers=2))
        >>> f = step_flops(clip, superbatch=40, subbatch=8, learner_patch_size=16, reference_cached=True)
        >>> f['reference_scoring']
        0.0
    """
    _check_step_args(superbatch, subbatch, low_res_fraction, low_res_patch_size, text_tokens, text_length_counts)
    learner = _unwrap_clip(clip)
    reference = _unwrap_clip(reference_clip) if reference_clip is not None else learner
    cost = _PerExample(image_size, include_text, text_tokens, text_length_counts, text_buckets, text_bucket_overhead)
    train, uniform_train = _train_flops(learner, cost, subbatch, low_res_fraction, low_res_patch_size)
    learner_scoring = 0.0
    if uses_learner:
        learner_scoring = (superbatch * (cost.image(learner, learner_patch_size) + cost.text(learner, superbatch))
                           + patch_resize_flops(learner.visual, learner_patch_size))
    live_reference = uses_reference and not reference_cached
    reference_scoring = (superbatch * (cost.image(reference, None) + cost.text(reference, superbatch))
                         if live_reference else 0.0)
    # Selection (blockwise, local scope, sigmoid): each chunk's logits against the N candidates, per scoring
    # model (a cached reference still needs its logits); see composer_jest.core.scoring.selection_flops.
    n_models = int(uses_learner) + int(uses_reference)
    selection = selection_flops('sigmoid', superbatch, subbatch, _embed_dim(learner), models=n_models)
    total = train + learner_scoring + reference_scoring + selection
    return {
        'train': float(train),
        'learner_scoring': float(learner_scoring),
        'reference_scoring': float(reference_scoring),
        'selection': float(selection),
        'total': float(total),
        'uniform_train': float(uniform_train),
        'ratio': float(total / uniform_train),
    }


def _check_step_args(superbatch: int, subbatch: int, low_res_fraction: float, low_res_patch_size: Optional[int],
                     text_tokens: Optional[int], text_length_counts: Optional[Sequence[int]]) -> None:
    """Raise ``ValueError`` naming the argument of :func:`step_flops` that is inconsistent."""
    if not isinstance(subbatch, int) or not isinstance(superbatch, int) or not 1 <= subbatch <= superbatch:
        raise ValueError(f'need integers 1 <= subbatch <= superbatch, got subbatch={subbatch}, superbatch={superbatch}')
    if not 0.0 <= low_res_fraction < 1.0:
        raise ValueError(f'low_res_fraction must be in [0, 1), got {low_res_fraction!r}')
    if low_res_fraction > 0 and low_res_patch_size is None:
        raise ValueError('low_res_fraction > 0 needs low_res_patch_size')
    if text_tokens is not None and text_length_counts is not None:
        raise ValueError('pass text_tokens (one length for every caption) or text_length_counts, not both')


@dataclass
class _PerExample:
    """Forward FLOPs of one image and one caption under :func:`step_flops`'s settings."""

    image_size: Optional[Size]
    include_text: bool
    text_tokens: Optional[int]
    text_length_counts: Optional[Sequence[int]]
    text_buckets: int
    text_bucket_overhead: float

    def image(self, model: nn.Module, patch: Optional[int]) -> float:
        return vit_forward_flops(model.visual, self.image_size, patch)

    def text(self, model: nn.Module, batch: int) -> float:
        """Per caption of a ``batch`` of captions (bucketed when the lengths are given)."""
        if not self.include_text:
            return 0.0
        counts = self.text_length_counts
        if counts is None:
            return text_forward_flops(model, self.text_tokens)
        # A batch of another size: the expected histogram, the super-batch's scaled to it (fractional counts).
        total = max(sum(counts), 1)
        counts = counts if batch == total else [c * batch / total for c in counts]
        return bucketed_text_flops(model, counts, self.text_buckets, self.text_bucket_overhead) / batch


def _train_flops(learner: nn.Module, cost: _PerExample, subbatch: int, low_res_fraction: float,
                 low_res_patch_size: Optional[int]) -> tuple[float, float]:
    """``(train, uniform_train)``: ≈ 3x the forward of the ``b`` trained examples (backward ≈ 2x forward), with
    ``round(fraction · b)`` images at the low-resolution patch (plus the FlexiViT kernel resize), and without."""
    d = _embed_dim(learner)
    n_low = int(round(low_res_fraction * subbatch)) if low_res_fraction > 0 else 0
    train_forward = (n_low * cost.image(learner, low_res_patch_size) + (subbatch - n_low) * cost.image(learner, None)
                     + subbatch * cost.text(learner, subbatch) + logits_flops(subbatch, d))
    if n_low:
        train_forward += patch_resize_flops(learner.visual, low_res_patch_size)
    uniform = subbatch * (cost.image(learner, None) + cost.text(learner, subbatch)) + logits_flops(subbatch, d)
    return 3.0 * train_forward, 3.0 * uniform


class StepFlopMeter:
    """Per-rank analytic FLOPs of scoring vs training for JEST's logs, recomputed only when the step's shape
    (sizes, image size, caption-length histogram, cached reference or not) changes."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._flops: Optional[dict] = None

    def metrics(self, model: Any, image: torch.Tensor, text: torch.Tensor, n: int, b: int, *,
                reference_cached: bool, **step_kwargs: Any) -> dict[str, float]:
        """``jest/flops_scoring`` and ``jest/flops_train`` from ``model.step_flops`` (the model contract)."""
        # The text towers encode each caption in length buckets (CLIPTowers.encode_text): cost them so.
        counts = tuple(length_histogram(caption_lengths(text), text.shape[1])) if text.dim() == 2 else None
        key = (n, b, reference_cached, tuple(image.shape[-2:]), counts)
        if key != self._key:
            self._flops = model.step_flops(superbatch=n, subbatch=b, image_size=key[3],
                                           reference_cached=reference_cached, text_length_counts=counts,
                                           **step_kwargs)
            self._key = key
        if self._flops is None:
            return {}
        f = self._flops
        return {'jest/flops_scoring': f['learner_scoring'] + f['reference_scoring'] + f['selection'],
                'jest/flops_train': f['train']}
