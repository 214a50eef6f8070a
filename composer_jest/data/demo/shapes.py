"""A procedural image–caption set with a real, learnable signal (the embedded default).

Each example is a coloured shape drawn at one of five positions on a noisy background, captioned
from templates that name the colour, the shape and the position. A ``noise`` fraction of examples
gets the caption of another random example (a mismatched, web-like pair); ``clean`` marks which.
Everything is a pure function of ``(seed, index)``, so the set needs no files and no network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from PIL import Image

__all__ = ['SHAPES', 'COLORS', 'POSITIONS', 'ShapesDataset', 'render_shape', 'shape_classnames', 'shapes_dataloader']

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring')
COLORS = {
    'red': (220, 40, 40),
    'green': (40, 190, 60),
    'blue': (50, 80, 230),
    'yellow': (235, 215, 40),
    'purple': (150, 60, 200),
    'white': (235, 235, 235),
}
POSITIONS = {  # name -> centre as a fraction of the image side (x, y)
    'top left': (0.3, 0.3),
    'top right': (0.7, 0.3),
    'bottom left': (0.3, 0.7),
    'bottom right': (0.7, 0.7),
    'center': (0.5, 0.5),
}
TEMPLATES = (
    'a {color} {shape} at the {position}',
    'a {color} {shape} in the {position}',
    'a picture of a {color} {shape}, {position}',
    '{color} {shape} drawn at the {position}',
    'the {position} has a {color} {shape}',
    'a small {color} {shape} near the {position}',
)
CLASS_TEMPLATES = ('a {name}', 'a picture of a {name}', 'a {name} drawn somewhere')


#: what ``ShapesDataset(label=...)`` classifies -> its class names, in label order
LABELS = {'shape': SHAPES, 'color': tuple(COLORS), 'position': tuple(POSITIONS)}


def shape_classnames(label: str = 'shape') -> list[str]:
    """Zero-shot class names of one attribute (``shape``, ``color`` or ``position``), in label order.

    Example:
        >>> shape_classnames('color')
        ['red', 'green', 'blue', 'yellow', 'purple', 'white']
    """
    if label not in LABELS:
        raise ValueError(f'label must be one of {tuple(LABELS)}, got {label!r}')
    return list(LABELS[label])


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == 'circle':
        return dx**2 + dy**2 <= r**2
    if shape == 'ring':
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == 'square':
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == 'diamond':
        return np.abs(dx) + np.abs(dy) <= r
    if shape == 'cross':
        w = 0.35 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == 'triangle':  # apex up: inside when below the two edges and above the base
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    raise ValueError(f'shape must be one of {SHAPES}, got {shape!r}')


def render_shape(shape: str, color: str, position: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size x size x 3`` uint8 image of one shape; jitter, scale and background noise come from ``rng``."""
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.06, 0.06)) * size
    cy = (fy + rng.uniform(-0.06, 0.06)) * size
    r = size * rng.uniform(0.14, 0.2)
    img = rng.normal(40, 12, size=(size, size, 3))
    img[_mask(shape, size, cx, cy, r)] = np.array(COLORS[color]) + rng.normal(0, 10, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural shapes × colours × positions with template captions and optional caption noise.

    Args:
        num_samples: length of the set.
        noise: fraction of examples whose caption describes another random example.
        seed: different seeds give disjoint-looking sets (use another seed for eval).
        image_size: side in pixels.
        transform: PIL image -> tensor (e.g. an open_clip preprocess); ``None`` returns the PIL image.
        tokenizer: list of captions -> ``LongTensor[n, context]``; ``None`` returns the caption string.
        label: the attribute ``label`` holds: ``shape`` (indexes :data:`SHAPES`), ``color`` (:data:`COLORS`)
            or ``position`` (:data:`POSITIONS`); :func:`shape_classnames` gives the matching class names.

    Items are dicts ``{image, text, label, clean, index}``.

    Example:
        >>> ds = ShapesDataset(8, noise=0.5, seed=0)
        >>> item = ds[0]
        >>> sorted(item)
        ['clean', 'image', 'index', 'label', 'text']
    """

    def __init__(
        self,
        num_samples: int,
        noise: float = 0.0,
        seed: int = 0,
        image_size: int = 32,
        transform: Optional[Callable] = None,
        tokenizer: Optional[Callable] = None,
        label: str = 'shape',
    ):
        if label not in LABELS:
            raise ValueError(f'label must be one of {tuple(LABELS)}, got {label!r}')
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f'noise must be in [0, 1], got {noise}')
        self.num_samples, self.noise, self.seed, self.image_size = num_samples, noise, seed, image_size
        self.transform, self.tokenizer, self.label = transform, tokenizer, label

    #: the keys of every item (:func:`composer_jest.core.batch.loader_batch_keys`)
    batch_keys = ('clean', 'image', 'index', 'label', 'text')

    def __len__(self) -> int:
        return self.num_samples

    def example(self, index: int) -> dict:
        """The raw example: PIL image, caption string, label and whether the caption matches."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for {self.num_samples} samples')
        rng = np.random.default_rng([self.seed, index])
        shape, color, position = _attributes(rng)
        image = Image.fromarray(render_shape(shape, color, position, self.image_size, rng))
        clean = bool(rng.uniform() >= self.noise)
        if not clean:  # caption of another, independently drawn example (it may collide by chance)
            shape_c, color_c, position_c = _attributes(rng)
            clean = (shape_c, color_c, position_c) == (shape, color, position)
        else:
            shape_c, color_c, position_c = shape, color, position
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        caption = template.format(color=color_c, shape=shape_c, position=position_c)
        label = LABELS[self.label].index({'shape': shape, 'color': color, 'position': position}[self.label])
        return {'image': image, 'caption': caption, 'label': label, 'clean': clean, 'index': index}

    def __getitem__(self, index: int) -> dict:
        ex = self.example(index)
        image = self.transform(ex['image']) if self.transform is not None else ex['image']
        text = self.tokenizer([ex['caption']])[0] if self.tokenizer is not None else ex['caption']
        return {'image': image, 'text': text, 'label': ex['label'], 'clean': ex['clean'], 'index': index}


def _attributes(rng: np.random.Generator) -> tuple[str, str, str]:
    return (
        SHAPES[rng.integers(len(SHAPES))],
        list(COLORS)[rng.integers(len(COLORS))],
        list(POSITIONS)[rng.integers(len(POSITIONS))],
    )


def shapes_dataloader(
    tokenizer: Callable,
    num_samples: int,
    batch_size: int,
    noise: float = 0.0,
    seed: int = 0,
    image_size: int = 32,
    shuffle: bool = True,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ShapesDataset` with open_clip's eval preprocessing.

    Shuffling draws from a generator seeded with ``seed``; training loaders drop the last partial batch.
    """
    import open_clip

    dataset = ShapesDataset(
        num_samples, noise=noise, seed=seed, image_size=image_size,
        transform=open_clip.image_transform(image_size, is_train=False), tokenizer=tokenizer,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=num_workers > 0,
    )
