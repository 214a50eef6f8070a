"""Data: the path a user's data takes (convert → MDS shards → stream super-batches), and demo sets.

``convert/`` (one module per source — folder, webdataset, parquet, demo sets — over one shared MDS writer,
``convert/writer.py``: atomic publish, local or ``s3://``), ``remote.py`` (S3 access and the one translation of
object-store failures, ``remote_errors``), ``streaming.py`` (verified shards → super-batches) and ``two_stage.py``
(decode the selected examples only) are the real path; ``demo/`` holds the built-in generated sets (shapes,
Fashion-MNIST captions and its web-like variant) used by the quickstart, the tests and the benchmarks.

May import ``core`` and ``models`` (e.g. the eval transform, FlexiViT sizes); never ``jest`` or ``run``.

The conversion and streaming names are imported lazily (on first use): ``import streaming`` pulls in
``transformers`` and takes seconds, which ``composer_jest.data.demo.shapes`` users should not pay.
"""

from importlib import import_module
from typing import Any

from composer_jest.data.demo.shapes import ShapesDataset, shape_classnames, shapes_dataloader

_LAZY = {
    # conversion (`composer-jest convert`)
    'ConvertSummary': 'convert', 'MDSOptions': 'convert', 'BadSampleError': 'convert', 'ConversionError': 'convert',
    'convert_folder': 'convert', 'convert_webdataset': 'convert', 'convert_shapes': 'convert',
    'convert_fashion_mnist': 'convert', 'convert_demo': 'convert', 'write_mds': 'convert', 'write_rows': 'convert',
    'convert_parquet': 'convert',
    # reading
    'ImageTextStreamingDataset': 'streaming', 'ShardError': 'streaming', 'build_streaming_dataloader': 'streaming',
    'RemoteAccessError': 'remote',
    # Fashion-MNIST demo set
    'FashionMNISTCaptions': 'demo.fashion_mnist', 'WebNoise': 'demo.fashion_mnist',
    'fashion_mnist_classnames': 'demo.fashion_mnist',
    # its web-like variant with a long tail, attributes and a curated subset (learning-efficiency benchmark)
    'FashionWebCaptions': 'demo.fashion_web', 'LongTail': 'demo.fashion_web', 'Attributes': 'demo.fashion_web',
}

__all__ = ['ShapesDataset', 'shape_classnames', 'shapes_dataloader', *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f'composer_jest.data.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
