"""A heterogeneous Fashion-MNIST "web" pool, built so that data selection has room to help.

A pool whose only defect is wrong captions caps any filter's speed-up at ``1 / clean fraction``. This pool
adds the other kinds of heterogeneity that web image–text data has, each behind a knob:

- **noise** (:class:`~composer_jest.data.demo.fashion_mnist.WebNoise`): mismatched captions (another item,
  other attributes) and junk alt-text;
- **a long tail** (:class:`LongTail`): a few classes are rare in the pool, and near duplicates are
  copies of a few "popular" images of the *common* classes (redundant, correctly captioned);
- **fine-grained content** (:class:`Attributes`): every image is rendered on a 32x32 canvas with visual
  attributes — orientation (upright / upside-down / sideways), layout (large and centred, or small in one
  of four corners), inverted colours, and sometimes a second, small item in the opposite corner — and the
  caption names them, so images of one class differ and captions tell them apart (hard negatives);
- **varied captions**: wrappers, synonyms and the order of the attribute phrases are drawn per example, so
  identical captions inside one batch are rare.

Every example is still a pure function of ``(seed, index)`` (:meth:`FashionWebCaptions.example`).
:meth:`FashionWebCaptions.curated` is the small clean, class-balanced, non-duplicated set a reference is
trained on; :meth:`FashionWebCaptions.evaluation` renders the official test split the same way (no noise,
no tail) with a canonical caption per image for attribute-aware retrieval.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from PIL import Image

from composer_jest.data.demo.fashion_mnist import (
    CLASSNAMES,
    JUNK_TEXTS,
    FashionMNISTCaptions,
    WebNoise,
    _with_article,
    curated_indices,
    load_fashion_mnist,
)

__all__ = [
    'CANVAS', 'CORNERS', 'ORIENTATIONS', 'WRAPPERS', 'LongTail', 'Attributes', 'ItemAttributes',
    'FashionWebCaptions', 'canonical_caption', 'zero_shot_classnames', 'ZERO_SHOT_TEMPLATES',
]

CANVAS = 32
CORNERS = ('top left', 'top right', 'bottom left', 'bottom right')
ORIENTATIONS = ('upright', 'upside-down', 'sideways')
# Caption wrappers around the description; ``{d}`` is the description (with its article).
WRAPPERS = (
    '{d}',
    'a photo of {d}',
    'a picture of {d}',
    'a product photo of {d}',
    'a grayscale photo of {d}',
    'here is {d}',
    'close-up of {d}',
    'catalog image: {d}',
    'this shows {d}',
    'an image of {d}',
)
_SIZE_WORDS = {'large': ('large', 'big'), 'small': ('small', 'tiny')}
_ORIENTATION_WORDS = {'upright': ('upright', ''), 'upside-down': ('upside-down', 'flipped'),
                      'sideways': ('sideways', 'rotated')}
_INVERTED_PHRASES = {True: ('on a white background', 'in negative colours'),
                     False: ('on a black background', '')}
ZERO_SHOT_TEMPLATES = ('a photo of {name}', '{name}', 'a picture of {name}')


def zero_shot_classnames() -> list[str]:
    """Class names with their article (use with :data:`ZERO_SHOT_TEMPLATES`, whose slot is ``{name}``)."""
    return [_with_article(n) for n in CLASSNAMES]


@dataclass(frozen=True)
class LongTail:
    """Class frequencies of the pool and which images near duplicates copy.

    Args:
        rare_classes: labels that are rare in the pool.
        rare_weight: sampling weight of a rare class relative to a common one (1.0: balanced).
        popular_per_class: near duplicates copy one of this many "popular" images per *common* class.
    """

    rare_classes: tuple[int, ...] = (2, 4, 6, 9)
    rare_weight: float = 0.1
    popular_per_class: int = 8

    def __post_init__(self):
        if not all(isinstance(c, int) and 0 <= c < len(CLASSNAMES) for c in self.rare_classes):
            raise ValueError(f'LongTail.rare_classes must be labels in [0, {len(CLASSNAMES)}), got {self.rare_classes}')
        if len(set(self.rare_classes)) >= len(CLASSNAMES):
            raise ValueError('LongTail.rare_classes must leave at least one common class')
        if not (isinstance(self.rare_weight, (int, float)) and 0.0 < self.rare_weight <= 1.0):
            raise ValueError(f'LongTail.rare_weight must be in (0, 1], got {self.rare_weight!r}')
        if not isinstance(self.popular_per_class, int) or self.popular_per_class < 1:
            raise ValueError(f'LongTail.popular_per_class must be an int >= 1, got {self.popular_per_class!r}')

    def class_weights(self) -> np.ndarray:
        """Normalised sampling probability of every class."""
        w = np.ones(len(CLASSNAMES))
        w[list(self.rare_classes)] = self.rare_weight
        return w / w.sum()

    @property
    def common_classes(self) -> tuple[int, ...]:
        return tuple(c for c in range(len(CLASSNAMES)) if c not in self.rare_classes)


@dataclass(frozen=True)
class Attributes:
    """Probabilities of the rendered visual attributes (named in the captions).

    Args:
        orientation: probabilities of ``ORIENTATIONS`` (upright, upside-down, sideways).
        small: probability that the item is small and in a corner (else large and centred).
        second_item: probability (given small) of a second small item in the opposite corner.
        inverted: probability of inverted colours (white background).
        mention: probability that a caption names each attribute (1.0: always).
    """

    orientation: tuple[float, float, float] = (0.5, 0.25, 0.25)
    small: float = 0.6
    second_item: float = 0.4
    inverted: float = 0.3
    mention: float = 0.9

    def __post_init__(self):
        if len(self.orientation) != 3 or abs(sum(self.orientation) - 1.0) > 1e-6 or min(self.orientation) < 0:
            raise ValueError(f'Attributes.orientation must be 3 probabilities summing to 1, got {self.orientation}')
        for name in ('small', 'second_item', 'inverted', 'mention'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f'Attributes.{name} must be a probability, got {value!r}')


@dataclass(frozen=True)
class ItemAttributes:
    """The attributes of one rendered image."""

    orientation: str = 'upright'
    small: bool = False
    corner: int = 0  # index into CORNERS (small items only)
    inverted: bool = False
    second_label: Optional[int] = None  # label of the second item (opposite corner), if any
    second_source: Optional[int] = None
    jitter: tuple[int, int] = field(default=(0, 0))

    @property
    def second_corner(self) -> int:
        return 3 - self.corner  # diagonally opposite


def canonical_caption(label: int, attrs: ItemAttributes) -> str:
    """One fixed wording naming every attribute (for attribute-aware retrieval on the test split)."""
    size = 'small' if attrs.small else 'large'
    text = f'{_with_article(size)} {attrs.orientation} {CLASSNAMES[label]}'
    if attrs.small:
        text += f' in the {CORNERS[attrs.corner]}'
    text += ' ' + _INVERTED_PHRASES[attrs.inverted][0]
    if attrs.second_label is not None:
        text += f' with {_with_article(CLASSNAMES[attrs.second_label])} in the {CORNERS[attrs.second_corner]}'
    return text


class FashionWebCaptions(FashionMNISTCaptions):
    """Heterogeneous web-like pool of rendered Fashion-MNIST items (see the module docstring).

    Args:
        split: ``'train'`` or ``'test'``.
        num_samples: pool size; with ``long_tail`` any size (images are drawn per class), else at most the
            split (or ``indices``) size.
        noise: mismatched / junk / near-duplicate fractions.
        long_tail: class frequencies and popular images; ``None``: example ``i`` uses image ``indices[i]``.
        attributes: rendered attribute probabilities.
        seed: seed of every per-example draw.
        indices: candidate positions in the split (default: all).
        root, transform, tokenizer: as :class:`~composer_jest.data.demo.fashion_mnist.FashionMNISTCaptions`.

    :meth:`example` adds ``attributes`` (:class:`ItemAttributes`), ``canonical`` (the caption an exact,
    fully detailed description would be), ``rare`` and ``duplicate`` flags to the base keys.

    Example:
        >>> pool = FashionWebCaptions('train', num_samples=1000, noise=WebNoise(mismatched=0.3), long_tail=LongTail())
        >>> pool.example(0)['image'].size
        (32, 32)
    """

    def __init__(
        self,
        split: str = 'train',
        num_samples: Optional[int] = None,
        noise: Optional[WebNoise] = None,
        long_tail: Optional[LongTail] = None,
        attributes: Optional[Attributes] = None,
        seed: int = 0,
        indices: Optional[Sequence[int]] = None,
        root: Optional[Union[str, os.PathLike]] = None,
        transform: Optional[Callable] = None,
        tokenizer: Optional[Callable] = None,
    ):
        super().__init__(split, None, noise, seed, indices, root, transform, tokenizer)
        self.long_tail, self.attribute_probs = long_tail, attributes if attributes is not None else Attributes()
        if num_samples is None:
            num_samples = len(self.indices)
        if long_tail is None and not 1 <= num_samples <= len(self.indices):
            raise ValueError(f'num_samples must be in [1, {len(self.indices)}] without a long tail, got {num_samples}')
        if num_samples < 1:
            raise ValueError(f'num_samples must be >= 1, got {num_samples}')
        self.num_samples = int(num_samples)
        candidate_labels = self.labels[self.indices]
        self._by_class = [self.indices[candidate_labels == c] for c in range(len(CLASSNAMES))]
        if long_tail is not None:
            rng = np.random.default_rng([seed, 0xD0])
            self._popular = np.concatenate([
                rng.choice(self._by_class[c], size=min(long_tail.popular_per_class, len(self._by_class[c])),
                           replace=False) for c in long_tail.common_classes])
            self._class_cdf = np.cumsum(long_tail.class_weights())
        else:
            self._popular = self.indices[: self.noise.duplicate_pool]

    @classmethod
    def curated(cls, num_samples: int = 2000, split: str = 'train', seed: int = 0, **kwargs) -> FashionWebCaptions:
        """The small clean, class-balanced, duplicate-free subset (attributes rendered as in the pool)."""
        _, labels = load_fashion_mnist(split, kwargs.get('root'))
        return cls(split, noise=WebNoise(), long_tail=None, seed=seed,
                   indices=curated_indices(labels, num_samples, seed), **kwargs)

    @classmethod
    def evaluation(cls, num_samples: int = 1000, seed: int = 0, **kwargs) -> FashionWebCaptions:
        """The official test split rendered like the pool: clean, balanced, a random subset of ``num_samples``."""
        _, labels = load_fashion_mnist('test', kwargs.get('root'))
        return cls('test', noise=WebNoise(), long_tail=None, seed=seed,
                   indices=curated_indices(labels, num_samples, seed), **kwargs)

    def __len__(self) -> int:
        return self.num_samples

    # -- steps ---------------------------------------------------------------------------------------------
    def source(self, index: int, kind: str, rng: np.random.Generator) -> int:
        """A popular image for near duplicates; else a class by the tail's weights, then an image of it."""
        if kind == 'near_duplicate':
            return int(self._popular[rng.integers(len(self._popular))])
        if self.long_tail is None:
            return int(self.indices[index])
        label = int(np.searchsorted(self._class_cdf, rng.uniform() * self._class_cdf[-1], side='right'))
        label = min(label, len(CLASSNAMES) - 1)
        members = self._by_class[label]
        return int(members[rng.integers(len(members))])

    def attributes(self, source: int, kind: str, rng: np.random.Generator) -> ItemAttributes:
        """Draw the visual attributes; near duplicates share the attributes of their popular original."""
        if kind == 'near_duplicate':  # a re-post of the same picture: attributes fixed by the source image
            own = np.random.default_rng([self.seed, int(source), 0xDA])
            return self._draw_attributes(own, source)
        return self._draw_attributes(rng, source)

    def _draw_attributes(self, rng: np.random.Generator, source: int) -> ItemAttributes:
        p = self.attribute_probs
        orientation = ORIENTATIONS[int(rng.choice(3, p=np.asarray(p.orientation)))]
        small = bool(rng.uniform() < p.small)
        corner = int(rng.integers(4))
        inverted = bool(rng.uniform() < p.inverted)
        second_label = second_source = None
        if small and rng.uniform() < p.second_item:
            label = int(self.labels[source])
            second_label = int((label + rng.integers(1, len(CLASSNAMES))) % len(CLASSNAMES))
            members = self._by_class[second_label]
            if len(members) == 0:
                members = np.flatnonzero(self.labels == second_label)
            second_source = int(members[rng.integers(len(members))])
        jitter = tuple(int(v) for v in rng.integers(-1, 2, size=2))
        return ItemAttributes(orientation, small, corner, inverted, second_label, second_source, jitter)

    def render(self, source: int, attrs: ItemAttributes, kind: str, rng: np.random.Generator) -> Image.Image:
        """Draw the item(s) on a ``CANVAS`` x ``CANVAS`` greyscale canvas; near duplicates are re-lit."""
        canvas = np.zeros((CANVAS, CANVAS), np.float32)
        item = self._orient(self.images[source], attrs.orientation)
        if attrs.small:
            self._paste(canvas, _resize(item, 16), attrs.corner, attrs.jitter)
            if attrs.second_source is not None:
                self._paste(canvas, _resize(self.images[attrs.second_source], 16), attrs.second_corner, (0, 0))
        else:
            y, x = 2 + attrs.jitter[0], 2 + attrs.jitter[1]
            canvas[y:y + 28, x:x + 28] = np.maximum(canvas[y:y + 28, x:x + 28], item)
        if kind == 'near_duplicate':
            shift = tuple(int(v) for v in rng.integers(-1, 2, size=2))
            canvas = np.roll(canvas, shift, axis=(0, 1)) * rng.uniform(0.85, 1.15)
            canvas = canvas + rng.normal(0, 4, size=canvas.shape)
        if attrs.inverted:
            canvas = 255.0 - canvas
        return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))

    @staticmethod
    def _orient(pixels: np.ndarray, orientation: str) -> np.ndarray:
        k = {'upright': 0, 'upside-down': 2, 'sideways': 1}[orientation]
        return np.rot90(pixels, k).astype(np.float32)

    @staticmethod
    def _paste(canvas: np.ndarray, item: np.ndarray, corner: int, jitter: tuple[int, int]) -> None:
        """Paste ``item`` (max-blend) into ``corner`` with a 1-pixel margin, moved by ``jitter`` (clipped)."""
        size = item.shape[0]
        far = CANVAS - size
        y = int(np.clip((1 if corner in (0, 1) else far - 1) + jitter[0], 0, far))
        x = int(np.clip((1 if corner in (0, 2) else far - 1) + jitter[1], 0, far))
        region = canvas[y:y + size, x:x + size]
        np.maximum(region, item, out=region)

    def describe(self, label: int, attrs: ItemAttributes, rng: np.random.Generator) -> str:
        """A varied description of an item with its attributes (each named with probability ``mention``)."""
        mention = self.attribute_probs.mention
        words = []
        if rng.uniform() < mention:
            words.append(_SIZE_WORDS['small' if attrs.small else 'large'][rng.integers(2)])
        if rng.uniform() < mention:
            word = _ORIENTATION_WORDS[attrs.orientation][rng.integers(2)]
            if word:
                words.append(word)
        words.append(CLASSNAMES[label])
        text = _with_article(' '.join(words))
        if attrs.small and rng.uniform() < mention:  # the corner stays next to the item it places
            text += ' ' + ('in the ', 'at the ')[rng.integers(2)] + CORNERS[attrs.corner]
        phrases = []
        if rng.uniform() < mention:
            phrase = _INVERTED_PHRASES[attrs.inverted][rng.integers(2)]
            if phrase:
                phrases.append(phrase)
        if attrs.second_label is not None and rng.uniform() < mention:
            second = _with_article(CLASSNAMES[attrs.second_label])
            phrases.append(('with ', 'next to ', 'and ')[rng.integers(3)] + second)
        order = rng.permutation(len(phrases))
        return ' '.join([text] + [phrases[i] for i in order])

    def caption(self, label: int, kind: str, rng: np.random.Generator,
                attrs: Optional[ItemAttributes] = None) -> str:
        """Junk alt-text, a description of another item (mismatched), or of this one, in a random wrapper."""
        if kind == 'junk':
            return JUNK_TEXTS[rng.integers(len(JUNK_TEXTS))].format(n=int(rng.integers(10000)))
        if attrs is None:
            attrs = ItemAttributes()
        if kind == 'mismatched':  # another item with other attributes: a caption from elsewhere on the page
            label = int((label + rng.integers(1, len(CLASSNAMES))) % len(CLASSNAMES))
            attrs = self._draw_attributes(rng, int(self._by_class[label][0]))
        return WRAPPERS[rng.integers(len(WRAPPERS))].format(d=self.describe(label, attrs, rng))

    def pair(self, source: int, label: int, kind: str, rng: np.random.Generator) -> dict:
        """The base keys plus ``attributes``, ``canonical``, ``rare`` and ``duplicate``."""
        attrs = self.attributes(source, kind, rng)
        image = self.render(source, attrs, kind, rng)
        return {
            'image': image,
            'caption': self.caption(label, kind, rng, attrs),
            'attributes': attrs,
            'canonical': canonical_caption(label, attrs),
            'rare': self.long_tail is not None and label in self.long_tail.rare_classes,
            'duplicate': kind == 'near_duplicate',
        }


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
