"""open_clip's eval image transform, built from an image tower's ``preprocess_cfg`` (the one definition: the model's
``image_transform()`` and the data loaders' two-stage decoders both use it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

__all__ = ['eval_transform']


def eval_transform(preprocess: dict[str, Any], image_size: Optional[int] = None) -> Callable:
    """open_clip's eval transform (resize the shortest side to ``S``, centre-crop ``S x S``, to tensor, normalise
    with the tower's mean/std) for a tower's ``preprocess_cfg``, at ``S = image_size`` (default: its own size).

    Example:
        >>> cfg = {'size': (32, 32), 'mode': 'RGB', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
        ...        'interpolation': 'bicubic', 'resize_mode': 'shortest', 'fill_color': 0}
        >>> from PIL import Image
        >>> tuple(eval_transform(cfg, image_size=16)(Image.new('RGB', (40, 20))).shape)
        (3, 16, 16)
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: PLC0415

    cfg = dict(preprocess)
    if image_size is not None:
        cfg['size'] = (image_size, image_size)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
