"""Source (c): the built-in demo sets (procedural shapes, Fashion-MNIST captions) as MDS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from composer_jest.data.convert.writer import ConvertSummary, MDSOptions, Record, write_mds

__all__ = ['DEMOS', 'convert_shapes', 'convert_fashion_mnist', 'convert_demo']


def _demo_records(dataset: Any, name: str) -> Iterator[Record]:
    for i in range(len(dataset)):
        def load(i: int = i) -> dict:
            ex = dataset.example(i)
            sample = {'image': ex['image'], 'caption': ex['caption'], 'label': int(ex['label']),
                      'clean': int(ex['clean'])}
            if 'kind' in ex:
                sample['meta'] = {'kind': ex['kind'], 'source': ex['source']}
            return sample
        yield f'{name}[{i}]', load


def convert_shapes(
    out: str,
    *,
    num_samples: int = 10_000,
    noise: float = 0.0,
    seed: int = 0,
    image_size: int = 32,
    options: Optional[MDSOptions] = None,
) -> ConvertSummary:
    """Write the procedural shapes set (:class:`~composer_jest.data.demo.shapes.ShapesDataset`) as PNG MDS shards."""
    from composer_jest.data.demo.shapes import ShapesDataset

    dataset = ShapesDataset(num_samples, noise=noise, seed=seed, image_size=image_size)
    columns = {'image': 'png', 'caption': 'str', 'label': 'int', 'clean': 'int'}
    return write_mds(_demo_records(dataset, 'shapes'), out, columns, options=options, total=len(dataset))


def convert_fashion_mnist(
    out: str,
    *,
    split: str = 'train',
    num_samples: Optional[int] = None,
    noise: Optional[Any] = None,
    curated: Optional[int] = None,
    seed: int = 0,
    root: Optional[str] = None,
    options: Optional[MDSOptions] = None,
) -> ConvertSummary:
    """Write Fashion-MNIST captions (:class:`~composer_jest.data.demo.fashion_mnist.FashionMNISTCaptions`) as MDS.

    Args:
        out: output directory or ``s3://bucket/prefix``.
        split: ``'train'`` or ``'test'``.
        num_samples: first ``num_samples`` images (default all).
        noise: :class:`~composer_jest.data.demo.fashion_mnist.WebNoise` (default: clean).
        curated: write instead the clean, class-balanced curated subset of this size (reference training).
        seed: seed of the per-example draws.
        root: folder with the IDX files (default: the Debian package's).
        options: see :func:`write_mds`.

    ``meta`` holds the noise ``kind`` and the ``source`` position of the image in the split.
    """
    from composer_jest.data.demo.fashion_mnist import FashionMNISTCaptions

    if curated is not None:
        if noise is not None:
            raise ValueError('curated subsets are clean: pass either curated= or noise=, not both')
        dataset = FashionMNISTCaptions.curated(curated, split=split, seed=seed, root=root)
    else:
        dataset = FashionMNISTCaptions(split, num_samples=num_samples, noise=noise, seed=seed, root=root)
    columns = {'image': 'png', 'caption': 'str', 'label': 'int', 'clean': 'int', 'meta': 'json'}
    return write_mds(_demo_records(dataset, f'fashion-mnist-{split}'), out, columns, options=options,
                     total=len(dataset))


DEMOS: dict[str, Callable[..., ConvertSummary]] = {'shapes': convert_shapes, 'fashion-mnist': convert_fashion_mnist}


def convert_demo(name: str, out: str, **kwargs: Any) -> ConvertSummary:
    """Write a built-in demo set: ``'shapes'`` or ``'fashion-mnist'`` (keyword arguments of its converter)."""
    if name not in DEMOS:
        raise ValueError(f'demo must be one of {tuple(DEMOS)}, got {name!r}')
    return DEMOS[name](out, **kwargs)

