"""Fashion-MNIST turned into a small, web-like image–caption set (real images, offline).

The images come from the Debian package ``dataset-fashion-mnist`` (IDX ``.gz`` files under
``/usr/share/datasets/fashion-mnist``; another folder via ``root=`` or ``$FASHION_MNIST_DIR``). Captions
are drawn from templates naming the class; configurable *web noise* then corrupts a fraction of the
pairs the way alt-text is corrupted on the web:

- ``mismatched``: the caption describes another class (a wrong pair);
- ``junk``: the caption is uninformative alt-text (file names, shop boilerplate);
- ``near_duplicate``: the image is a lightly perturbed copy of a few "popular" images (redundancy).

Each example is a pure function of ``(seed, index)`` (:meth:`FashionMNISTCaptions.example`), assembled
by small steps (which noise kind, which source image, which caption) so that later variants — long-tail
class frequencies, fine-grained attribute captions — can override a single step.
:meth:`FashionMNISTCaptions.curated` gives the small clean, class-balanced subset used to train
reference models.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    'CLASSNAMES', 'CLASS_TEMPLATES', 'TEMPLATES', 'JUNK_TEXTS', 'DEFAULT_ROOT', 'NOISE_KINDS',
    'WebNoise', 'FashionMNISTCaptions', 'fashion_mnist_classnames', 'format_caption', 'fashion_mnist_root',
    'load_fashion_mnist', 'curated_indices',
]

DEFAULT_ROOT = '/usr/share/datasets/fashion-mnist'
ROOT_ENV = 'FASHION_MNIST_DIR'
SPLITS = {'train': 'train', 'test': 't10k'}
# Fashion-MNIST labels 0..9, named as a caption would name them.
CLASSNAMES = ('t-shirt', 'pair of trousers', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
              'ankle boot')
TEMPLATES = (
    '{a_name}',
    'a photo of {a_name}',
    'a black and white photo of {a_name}',
    'a product photo of {a_name}',
    'a low resolution photo of {a_name}',
    '{name}, studio shot on a dark background',
    'a grayscale picture of {a_name}',
    'buy this {name} online',
)
CLASS_TEMPLATES = ('a photo of {a_name}', '{a_name}', 'a black and white photo of {a_name}')
JUNK_TEXTS = (
    'IMG_{n:04d}.jpg',
    'DSC{n:05d}',
    'image',
    'untitled-{n}',
    'click here to see more',
    'free shipping on orders over ${n}',
    'stock photo {n}',
    'thumbnail',
    'product {n}',
    'new arrivals',
)
NOISE_KINDS = ('clean', 'mismatched', 'junk', 'near_duplicate')


def _with_article(name: str) -> str:
    return ('an ' if name[0] in 'aeiou' else 'a ') + name


def format_caption(template: str, name: str) -> str:
    """Fill a template's ``{name}`` and ``{a_name}`` (the name with its article)."""
    return template.format(name=name, a_name=_with_article(name))


def fashion_mnist_classnames() -> list[str]:
    """Zero-shot class names, in label order (use with :data:`CLASS_TEMPLATES`)."""
    return list(CLASSNAMES)


def fashion_mnist_root(root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files; raises a clear error when it is missing.

    Looks at ``root``, then ``$FASHION_MNIST_DIR``, then the Debian package's ``/usr/share/datasets/fashion-mnist``.
    """
    path = Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    expected = [f'{prefix}-{kind}-idx{dim}-ubyte.gz' for prefix in SPLITS.values()
                for kind, dim in (('images', 3), ('labels', 1))]
    missing = [name for name in expected if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files {missing} not found in {path}. Install the Debian package '
            f'`dataset-fashion-mnist` (sudo apt-get install dataset-fashion-mnist), or point root= / '
            f'${ROOT_ENV} at a folder with the original IDX .gz files.',
        )
    return path


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte, the only type Fashion-MNIST uses
        raise ValueError(f'{path}: not an unsigned-byte IDX file (header {data[:4].hex()})')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f'{path}: truncated IDX file ({array.size} values for shape {shape})')
    return array.reshape(shape)


@functools.lru_cache(maxsize=4)
def _load(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = SPLITS[split]
    images = _read_idx(Path(root) / f'{prefix}-images-idx3-ubyte.gz')
    labels = _read_idx(Path(root) / f'{prefix}-labels-idx1-ubyte.gz').astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f'{root}: {split} has {len(images)} images but {len(labels)} labels')
    return images, labels


def load_fashion_mnist(split: str = 'train', root: Optional[Union[str, os.PathLike]] = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28], labels int64 [n])`` of a split (``'train'``: 60k, ``'test'``: 10k); cached."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {tuple(SPLITS)}, got {split!r}')
    return _load(str(fashion_mnist_root(root)), split)


@dataclass(frozen=True)
class WebNoise:
    """Fractions of web-like corruption; they must sum to at most 1 (the rest is clean).

    Args:
        mismatched: fraction whose caption names another class.
        junk: fraction whose caption is uninformative alt-text (:data:`JUNK_TEXTS`).
        near_duplicate: fraction whose image is a perturbed copy of one of the first ``duplicate_pool``
            examples (captioned correctly: redundant rather than wrong).
        duplicate_pool: how many "popular" examples near-duplicates are copied from.
    """

    mismatched: float = 0.0
    junk: float = 0.0
    near_duplicate: float = 0.0
    duplicate_pool: int = 100

    def __post_init__(self):
        for name in ('mismatched', 'junk', 'near_duplicate'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f'WebNoise.{name} must be a fraction in [0, 1], got {value!r}')
        if self.mismatched + self.junk + self.near_duplicate > 1.0 + 1e-9:
            raise ValueError(
                f'WebNoise fractions must sum to at most 1, got mismatched={self.mismatched} + junk={self.junk} + '
                f'near_duplicate={self.near_duplicate}',
            )
        if not isinstance(self.duplicate_pool, int) or self.duplicate_pool < 1:
            raise ValueError(f'WebNoise.duplicate_pool must be an int >= 1, got {self.duplicate_pool!r}')

    @property
    def total(self) -> float:
        return self.mismatched + self.junk + self.near_duplicate


def curated_indices(labels: np.ndarray, num_samples: int, seed: int = 0) -> np.ndarray:
    """A class-balanced random subset of ``num_samples`` positions of ``labels`` (sorted)."""
    classes = np.unique(labels)
    if not 1 <= num_samples <= len(labels):
        raise ValueError(f'num_samples must be in [1, {len(labels)}], got {num_samples}')
    rng = np.random.default_rng([seed, 0xC0])
    per_class = np.full(len(classes), num_samples // len(classes))
    per_class[rng.permutation(len(classes))[: num_samples % len(classes)]] += 1
    chosen = []
    for cls, count in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


class FashionMNISTCaptions(torch.utils.data.Dataset):
    """Fashion-MNIST images with template captions and configurable web noise.

    Args:
        split: ``'train'`` (60k images) or ``'test'`` (10k).
        num_samples: use the first ``num_samples`` images (of ``indices`` if given); ``None``: all.
        noise: :class:`WebNoise` fractions (default: none, every pair clean).
        seed: seed of every per-example draw (template, noise kind, perturbation).
        indices: positions in the split to use (e.g. :func:`curated_indices`); default: all in order.
        root: folder with the IDX files (see :func:`fashion_mnist_root`).
        transform: PIL image -> tensor; ``None`` returns the PIL image (28x28, mode ``L``).
        tokenizer: list of captions -> ``LongTensor[n, context]``; ``None`` returns the caption string.

    Items are dicts ``{image, text, label, clean, index}``; :meth:`example` also gives ``caption``,
    ``kind`` (one of :data:`NOISE_KINDS`) and ``source`` (position of the image in the split).

    Example:
        >>> ds = FashionMNISTCaptions('test', num_samples=100, noise=WebNoise(mismatched=0.2), seed=0)
        >>> sorted(ds.example(0))
        ['caption', 'clean', 'image', 'index', 'kind', 'label', 'source']
    """

    def __init__(
        self,
        split: str = 'train',
        num_samples: Optional[int] = None,
        noise: Optional[WebNoise] = None,
        seed: int = 0,
        indices: Optional[Sequence[int]] = None,
        root: Optional[Union[str, os.PathLike]] = None,
        transform: Optional[Callable] = None,
        tokenizer: Optional[Callable] = None,
    ):
        self.images, self.labels = load_fashion_mnist(split, root)
        pool = np.arange(len(self.labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if pool.size and (pool.min() < 0 or pool.max() >= len(self.labels)):
            raise ValueError(f'indices must lie in [0, {len(self.labels)}) for split {split!r}')
        if num_samples is not None:
            if not 1 <= num_samples <= len(pool):
                raise ValueError(f'num_samples must be in [1, {len(pool)}] for split {split!r}, got {num_samples}')
            pool = pool[:num_samples]
        self.split, self.indices, self.seed = split, pool, seed
        self.noise = noise if noise is not None else WebNoise()
        self.transform, self.tokenizer = transform, tokenizer

    @classmethod
    def curated(cls, num_samples: int = 1000, split: str = 'train', seed: int = 0, **kwargs) -> FashionMNISTCaptions:
        """The small clean, class-balanced subset for training a reference model (no noise)."""
        _, labels = load_fashion_mnist(split, kwargs.get('root'))
        return cls(split, noise=WebNoise(), seed=seed, indices=curated_indices(labels, num_samples, seed), **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    # -- the steps of one example; override one to change one aspect ------------------------------------
    def noise_kind(self, rng: np.random.Generator) -> str:
        """Which corruption (or ``'clean'``) this example gets."""
        u, n = rng.uniform(), self.noise
        if u < n.mismatched:
            return 'mismatched'
        if u < n.mismatched + n.junk:
            return 'junk'
        if u < n.total:
            return 'near_duplicate'
        return 'clean'

    def source(self, index: int, kind: str, rng: np.random.Generator) -> int:
        """Position in the split of the example's image."""
        if kind == 'near_duplicate':
            return int(self.indices[rng.integers(min(self.noise.duplicate_pool, len(self.indices)))])
        return int(self.indices[index])

    def image(self, source: int, kind: str, rng: np.random.Generator) -> Image.Image:
        """The 28x28 greyscale image; near-duplicates are shifted by a pixel and re-lit."""
        pixels = self.images[source]
        if kind == 'near_duplicate':
            shifted = np.roll(pixels, shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)).astype(np.float32)
            pixels = np.clip(shifted * rng.uniform(0.85, 1.15) + rng.normal(0, 4, size=shifted.shape), 0, 255)
        return Image.fromarray(pixels.astype(np.uint8))  # 2-D uint8: mode L

    def caption(self, label: int, kind: str, rng: np.random.Generator) -> str:
        """Template caption of ``label``; another class's for mismatched pairs; alt-text junk for junk."""
        if kind == 'junk':
            return JUNK_TEXTS[rng.integers(len(JUNK_TEXTS))].format(n=int(rng.integers(10000)))
        if kind == 'mismatched':
            label = int((label + rng.integers(1, len(CLASSNAMES))) % len(CLASSNAMES))
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        return format_caption(template, CLASSNAMES[label])

    def example(self, index: int) -> dict:
        """The raw example: PIL image, caption, label (of the image), clean flag, noise kind, source position."""
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for {len(self)} samples')
        rng = np.random.default_rng([self.seed, index])
        kind = self.noise_kind(rng)
        source = self.source(index, kind, rng)
        label = int(self.labels[source])
        pair = self.pair(source, label, kind, rng)
        return {**pair, 'label': label, 'clean': kind in ('clean', 'near_duplicate'), 'index': index, 'kind': kind,
                'source': source}

    def pair(self, source: int, label: int, kind: str, rng: np.random.Generator) -> dict:
        """The image and caption of one example (subclasses add their own keys)."""
        image = self.image(source, kind, rng)
        return {'image': image, 'caption': self.caption(label, kind, rng)}

    def __getitem__(self, index: int) -> dict:
        ex = self.example(index)
        image = self.transform(ex['image']) if self.transform is not None else ex['image']
        text = self.tokenizer([ex['caption']])[0] if self.tokenizer is not None else ex['caption']
        return {'image': image, 'text': text, 'label': ex['label'], 'clean': ex['clean'], 'index': index}
