"""Synthetic photo-like JPEGs at web sizes, for the two-stage decoding tests and the loader benchmark.

Real image–text sets (img2dataset resizes) hold JPEGs of a few hundred pixels a side at ~20–40 KB. What a
decoder's speed depends on is the size, the chroma subsampling and the entropy of the coefficients; these
images have smooth colour gradients (low frequencies), a few soft blobs (edges), and Gaussian texture noise
(high-frequency coefficients: ~27 KB on average at 256-512 px), at quality 85 (PIL's 4:2:0).

Example:
    >>> data = synthetic_jpegs(2, seed=0, sides=(256, 512))
    >>> from PIL import Image; import io
    >>> [Image.open(io.BytesIO(d)).format for d in data]
    ['JPEG', 'JPEG']
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ['synthetic_jpegs']


def synthetic_jpegs(n: int, seed: int = 0, sides: tuple[int, int] = (256, 512), quality: int = 85,
                    noise: float = 9.0) -> list[bytes]:
    """``n`` JPEG files with each side drawn from ``sides`` (mixed aspect ratios), seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        x, y = x / width, y / height
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
        image = c0 * (1 - t) + c1 * t  # a colour gradient
        for _ in range(int(rng.integers(2, 6))):  # soft blobs
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            mask = 1 / (1 + np.exp((np.hypot(x - cx, y - cy) - r) * 40))
            image += mask[..., None] * rng.uniform(-120, 120, size=3).astype(np.float32)
        image += rng.normal(0, noise, size=image.shape).astype(np.float32)  # texture
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=quality)
        out.append(buf.getvalue())
    return out
