"""FlexiViT: run an open_clip ViT image tower at another patch size without touching its weights.

JEST scores the learner cheaply by encoding the super-batch with larger patches (fewer tokens).
Following FlexiViT (Beyer et al., 2023, "FlexiViT: One Model for All Patch Sizes"), the patch
embedding kernel is resized with the *pseudo-inverse resize* and the positional embeddings are
interpolated to the new token grid; everything else in open_clip's ``VisionTransformer.forward`` is
reproduced unchanged, functionally (the module is never mutated and gradients reach its parameters).

Pseudo-inverse resize, in one paragraph. Let ``x`` be a flattened ``p_old x p_old`` patch and ``w`` one
(flattened) filter of the patch embedding, so the token component is ``<x, w>``. Resizing a patch is a
linear map, ``resize(x) = B x`` with ``B`` of shape ``(p_new², p_old²)`` (its columns are the resized
basis patches). We want a new filter ``ŵ`` with ``<x, w> = <B x, ŵ>`` for every ``x``, i.e.
``Bᵀ ŵ = w``. The least-norm solution is ``ŵ = pinv(Bᵀ) w = pinv(B)ᵀ w``. When ``p_new ≥ p_old``,
``B`` has full column rank and the identity is exact: an image upsampled patch-wise by
``p_new / p_old`` yields the same tokens as the original image through the original kernel. For
``p_new < p_old`` it is the least-squares best approximation, which is what makes coarse-patch scoring
sensible.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from torch import nn

__all__ = [
    'check_patch_size', 'encode_image_at', 'vit_tokens', 'vit_head', 'resize_matrix', 'pinv_resize_matrix',
    'resize_patch_embed', 'valid_patch_sizes', 'scoring_image_size', 'scoring_patch_size',
]

# Derived matrices, keyed by (kind, old_size, new_size, interpolation, antialias, device, dtype).
# They depend only on sizes, so they are built once per process and shared by every model.
_MATRIX_CACHE: dict[tuple, torch.Tensor] = {}

# The non-ViT fallback warns once per process.
_warned_non_vit: bool = False

Size2 = tuple[int, int]


def _pair(size: int | tuple[int, int] | list[int]) -> Size2:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def resize_matrix(
    old: Size2,
    new: Size2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    interpolation: str = 'bicubic',
    antialias: bool = True,
) -> torch.Tensor:
    """The linear map ``B`` that resizes a flattened ``old`` patch to a flattened ``new`` patch (cached).

    Column ``k`` of ``B`` is the ``k``-th one-hot ``old`` patch resized with ``F.interpolate`` (the same
    resize timm's ``resample_patch_embed`` uses), so ``B @ x.flatten() == interpolate(x).flatten()`` for
    any single-channel patch ``x`` (row-major flattening).

    Args:
        old: ``(height, width)`` of the source patch.
        new: ``(height, width)`` of the resized patch.
        device: Device of the returned matrix.
        dtype: Floating dtype of the returned matrix.
        interpolation: ``F.interpolate`` mode (timm default: ``'bicubic'``).
        antialias: ``F.interpolate`` antialias flag (timm default: ``True``).

    Returns:
        Tensor of shape ``(new_h * new_w, old_h * old_w)``. The tensor is shared through the cache:
        do not modify it in place.
    """
    old, new = _pair(old), _pair(new)
    device = torch.empty(0, device=device).device  # canonical key: 'cpu', 'cuda:0', ...
    key = ('resize', old, new, interpolation, antialias, device, dtype)
    matrix = _MATRIX_CACHE.get(key)
    if matrix is None:
        # Build outside inference mode / autocast / autograd so the cached tensor is a plain tensor
        # usable later in any context (an inference tensor cannot be saved for backward).
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            n_old = old[0] * old[1]
            basis = torch.eye(n_old, device=device, dtype=dtype).reshape(n_old, 1, *old)
            resized = F.interpolate(basis, size=new, mode=interpolation, antialias=antialias, align_corners=False)
            matrix = resized.reshape(n_old, new[0] * new[1]).T.contiguous()  # (new², old²)
        _MATRIX_CACHE[key] = matrix
    return matrix


def pinv_resize_matrix(
    old: Size2,
    new: Size2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    interpolation: str = 'bicubic',
    antialias: bool = True,
) -> torch.Tensor:
    """``pinv(B)`` for the resize matrix ``B`` of :func:`resize_matrix` (cached; the costly part).

    A flattened kernel row ``w`` (shape ``(old²,)``) maps to ``ŵ = pinv(B)ᵀ w``, i.e. ``w @ pinv(B)``.

    Args:
        old: ``(height, width)`` of the source patch.
        new: ``(height, width)`` of the resized patch.
        device: Device of the returned matrix.
        dtype: Floating dtype of the returned matrix.
        interpolation: ``F.interpolate`` mode used to build ``B``.
        antialias: ``F.interpolate`` antialias flag used to build ``B``.

    Returns:
        Tensor of shape ``(old_h * old_w, new_h * new_w)`` (shared through the cache; do not modify).
    """
    old, new = _pair(old), _pair(new)
    device = torch.empty(0, device=device).device
    key = ('pinv', old, new, interpolation, antialias, device, dtype)
    matrix = _MATRIX_CACHE.get(key)
    if matrix is None:
        b = resize_matrix(old, new, device, dtype, interpolation=interpolation, antialias=antialias)
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
            matrix = torch.linalg.pinv(b).contiguous()
        _MATRIX_CACHE[key] = matrix
    return matrix


def resize_patch_embed(
    weight: torch.Tensor,
    new_size: int | Size2,
    *,
    interpolation: str = 'bicubic',
    antialias: bool = True,
) -> torch.Tensor:
    """Pseudo-inverse resize of a patch-embedding kernel (timm ``resample_patch_embed`` semantics).

    The result is a linear function of ``weight``, so gradients flow back to it. The pseudo-inverse is
    cached per size pair; only a small matmul runs per call.

    Args:
        weight: Conv kernel ``(out_ch, in_ch, h, w)``.
        new_size: Target kernel size, an int or ``(height, width)``.
        interpolation: ``F.interpolate`` mode of the underlying patch resize.
        antialias: ``F.interpolate`` antialias flag of the underlying patch resize.

    Returns:
        Kernel ``(out_ch, in_ch, *new_size)`` in ``weight``'s dtype.
    """
    if weight.ndim != 4:
        raise ValueError(f'expected a 4D conv kernel (out_ch, in_ch, h, w), got shape {tuple(weight.shape)}')
    old, new = _pair(tuple(weight.shape[-2:])), _pair(new_size)
    if old == new:
        return weight
    # Resize in float32 (float64 if the weights are), like timm, then cast back.
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    pinv = pinv_resize_matrix(old, new, weight.device, work_dtype, interpolation=interpolation, antialias=antialias)
    out_ch, in_ch = weight.shape[:2]
    with torch.autocast(weight.device.type, enabled=False):  # keep the resize itself in work_dtype
        resized = weight.reshape(out_ch, in_ch, -1).to(work_dtype) @ pinv  # row-wise ŵ = pinv(B)ᵀ w
    return resized.reshape(out_ch, in_ch, *new).to(weight.dtype)


def valid_patch_sizes(image_size: int | Size2) -> list[int]:
    """Patch sizes that tile an image exactly: common divisors of its height and width.

    Args:
        image_size: Image size, an int or ``(height, width)``.

    Returns:
        Sorted list of all ``p >= 1`` dividing both sides.
    """
    height, width = _pair(image_size)
    g = math.gcd(height, width)
    return [p for p in range(1, g + 1) if g % p == 0]


def _check_patch_size(patch_size: int, image_size: Size2, name: str = 'patch_size') -> None:
    valid = valid_patch_sizes(image_size)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size not in valid:
        raise ValueError(
            f'{name}={patch_size!r} does not tile a {image_size[0]}x{image_size[1]} image; '
            f'valid patch sizes are {valid}'
        )


def check_patch_size(visual: torch.nn.Module, patch_size: int | None, name: str = 'patch_size') -> None:
    """Fail early when ``visual`` cannot encode at ``patch_size``.

    A ViT needs a patch size that tiles its image. open_clip's ``ModifiedResNet`` cannot take a
    smaller image (its attention pool has a fixed-size positional embedding), so it has no cheap
    scoring resolution at all. Other towers are scored on a downscaled image.

    Raises:
        ValueError: naming ``name`` and the valid values.
    """
    if patch_size is None:
        return
    tower = getattr(visual, '_orig_mod', visual)
    if isinstance(tower, VisionTransformer):
        _check_patch_size(patch_size, _pair(tower.image_size), name)
    elif isinstance(tower, ModifiedResNet):
        raise ValueError(
            f'{name}={patch_size!r} needs a ViT image tower; open_clip ModifiedResNet has a fixed-size '
            f'attention pool and cannot encode a smaller image. Set {name} to null (None).'
        )


def _pool(visual: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``VisionTransformer._pool`` of open_clip 3.3.0, reproduced."""
    if visual.attn_pool is not None:
        if visual.attn_pool_contrastive is not None:
            x = visual.ln_post(x)
            tokens = visual.attn_pool(x)
            if visual.attn_pool_type == 'parallel':
                pooled = visual.attn_pool_contrastive(x)
            elif visual.attn_pool_type == 'cascade':
                pooled = visual.attn_pool_contrastive(tokens)
            else:
                raise NotImplementedError(f'attentional pool type {visual.attn_pool_type!r} is not supported')
        else:
            x = visual.attn_pool(x)
            x = visual.ln_post(x)
            pooled, tokens = visual._global_pool(x)
    elif visual.final_ln_after_pool:
        pooled, tokens = visual._global_pool(x)
        pooled = visual.ln_post(pooled)
    else:
        x = visual.ln_post(x)
        pooled, tokens = visual._global_pool(x)
    return pooled, tokens


def vit_tokens(visual: VisionTransformer, image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The tokens ``visual.transformer`` reads, ``[B, 1 + grid, width]``, with the patch embedding at ``patch_size``.

    open_clip's ``VisionTransformer.forward`` up to its transformer, always on the functional path (also at the
    native patch size, where the kernel and positional embeddings are used as they are).
    """
    conv = visual.conv1
    if tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding) or any(d != 1 for d in conv.dilation):
        raise NotImplementedError('FlexiViT resize needs a non-overlapping patch embedding (stride == kernel)')
    if conv.groups != 1:
        raise NotImplementedError('FlexiViT resize does not support a grouped patch embedding conv')
    height, width = image.shape[-2:]
    _check_patch_size(patch_size, (height, width))
    new_patch = (patch_size, patch_size)

    # Patch embedding: x_tokens = <patch, ŵ> with ŵ the pseudo-inverse-resized kernel.
    weight = resize_patch_embed(conv.weight, new_patch)
    x = F.conv2d(image, weight, conv.bias, stride=new_patch)  # (B, width, gh, gw)
    new_grid = [x.shape[-2], x.shape[-1]]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, gh*gw, width)

    # Class token, then positional embeddings interpolated from the native grid (class token kept as is).
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    old_grid = list(visual.grid_size)
    pos = resample_abs_pos_embed(visual.positional_embedding[None], new_grid, old_grid, num_prefix_tokens=1)[0]
    x = x + pos.to(x.dtype)

    x = visual.patch_dropout(x)
    return visual.ln_pre(x)


def vit_head(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``VisionTransformer.forward`` after its transformer: pool, project (``x``: its output)."""
    pooled, tokens = _pool(visual, x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    if visual.output_tokens:
        return pooled, tokens
    return pooled


def _vit_forward(
    visual: VisionTransformer, image: torch.Tensor, patch_size: int
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``VisionTransformer.forward`` with the patch embedding run at ``patch_size``.

    Always takes the functional path (also at the native patch size), so tests can compare it with
    ``visual(image)``.
    """
    return vit_head(visual, visual.transformer(vit_tokens(visual, image, patch_size)))


def encode_image_at(
    visual: nn.Module,
    image: torch.Tensor,
    patch_size: int | None,
    *,
    native_patch_size: int = 16,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode ``image`` with open_clip image tower ``visual`` at patch size ``patch_size`` (FlexiViT).

    For an open_clip ``VisionTransformer``, the patch embedding kernel is pseudo-inverse resized to
    ``patch_size`` and the positional embeddings are interpolated to the new grid; the tower's modules
    and parameters are used as they are (no mutation; gradients reach the original parameters).

    Any other tower (``ModifiedResNet``, ``TimmModel``, ...) has no patch size: it runs on the image
    downscaled by ``native_patch_size / patch_size`` instead, with a one-time warning. Towers that need
    a fixed input size then fail with their own error.

    Args:
        visual: The image tower, ``clip.visual``.
        image: Images ``(B, C, H, W)``.
        patch_size: Patch size to encode at. ``None`` or the tower's own patch size calls
            ``visual(image)`` directly. For a ViT it must divide ``H`` and ``W``.
        native_patch_size: Only for non-ViT towers: the nominal patch size ``patch_size`` is relative to.

    Returns:
        What ``visual(image)`` returns: the pooled, projected features ``(B, output_dim)`` (a
        ``(pooled, tokens)`` pair if the tower has ``output_tokens=True``).

    Raises:
        ValueError: ``patch_size`` does not tile the image (the message lists the valid sizes), or is
            not a positive int.
    """
    if patch_size is None:
        return visual(image)
    vit = getattr(visual, '_orig_mod', visual)  # see through torch.compile's wrapper
    if isinstance(vit, VisionTransformer):
        if _pair(vit.patch_size) == (patch_size, patch_size) and tuple(image.shape[-2:]) == _pair(vit.image_size):
            return visual(image)
        return _vit_forward(vit, image, patch_size)

    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f'patch_size must be a positive int or None, got {patch_size!r}')
    if patch_size == native_patch_size:
        return visual(image)
    check_patch_size(vit, patch_size)
    global _warned_non_vit
    if not _warned_non_vit:
        _warned_non_vit = True
        warnings.warn(
            f'{type(vit).__name__} is not a ViT; scoring on a downscaled image instead of FlexiViT patch '
            f'resizing (scale {native_patch_size}/{patch_size})',
            UserWarning,
            stacklevel=2,
        )
    scale = native_patch_size / patch_size
    size = [max(1, round(s * scale)) for s in image.shape[-2:]]
    return visual(F.interpolate(image, size=size, mode='bilinear', antialias=True, align_corners=False))


def scoring_image_size(image_size: int, native_patch_size: int, learner_patch_size: Optional[int]) -> int:
    """``S_low = S p_native / p_learner``: the image side whose native-patch token grid is the scoring grid.

    Raises:
        ValueError: when ``S_low`` is not a whole number of native patches.

    Example:
        >>> scoring_image_size(64, 8, 16), scoring_image_size(224, 16, None)
        (32, 224)
        >>> scoring_image_size(224, 16, 48)
        Traceback (most recent call last):
        ...
        ValueError: two-stage decoding scores at image side 224 * 16 / 48 = 74.7, which must be a whole number of native patches 16; use a learner_patch_size among [16, 28, 32, 56, 112, 224]
    """  # noqa: E501
    if learner_patch_size is None:
        return image_size
    side = image_size * native_patch_size / learner_patch_size  # a whole number of native patches iff p | S
    if image_size % learner_patch_size or learner_patch_size < native_patch_size:
        valid = [p for p in range(native_patch_size, image_size + 1) if image_size % p == 0]
        raise ValueError(f'two-stage decoding scores at image side {image_size} * {native_patch_size} / '
                         f'{learner_patch_size} = {side:.1f}, which must be a whole number of native patches '
                         f'{native_patch_size}; use a learner_patch_size among {valid}')
    return int(side)


def scoring_patch_size(learner_patch_size: Optional[int], low_side: int, full_side: int) -> Optional[int]:
    """``p_learner S_low / S``: the patch at which stage-1 images of side ``S_low`` give the token grid that
    ``learner_patch_size`` gives on full images of side ``S`` (the inverse of :func:`scoring_image_size`).

    Example:
        >>> scoring_patch_size(32, 112, 224), scoring_patch_size(None, 224, 224)
        (16, None)
    """
    if learner_patch_size is None:
        if low_side != full_side:
            raise ValueError(f'two-stage images of side {low_side} (training side {full_side}) need '
                             f'learner_patch_size = {full_side} * native patch / {low_side}')
        return None
    patch = learner_patch_size * low_side / full_side
    if patch != int(patch):
        raise ValueError(f'two-stage images of side {low_side} do not match learner_patch_size={learner_patch_size} '
                         f'at training side {full_side}: {learner_patch_size} * {low_side} / {full_side} is not an '
                         'integer patch (see composer_jest.models.flexi.scoring_image_size)')
    return int(patch)
