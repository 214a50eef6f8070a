"""Data: built-in demo sets, conversion to MDS shards, and streaming super-batches from them.

The conversion and streaming names are imported lazily (on first use): ``import streaming`` pulls in
``transformers`` and takes seconds, which ``composer_jest.data.shapes`` users should not pay.
"""

from importlib import import_module
from typing import Any

from composer_jest.data.shapes import ShapesDataset, shape_classnames, shapes_dataloader

_LAZY = {
    # conversion (`composer-jest convert`)
    'ConvertSummary': 'convert', 'MDSOptions': 'convert', 'BadSampleError': 'convert', 'ConversionError': 'convert',
    'convert_folder': 'convert', 'convert_webdataset': 'convert', 'convert_shapes': 'convert',
    'convert_fashion_mnist': 'convert', 'convert_demo': 'convert', 'write_mds': 'convert',
    # reading
    'ImageTextStreamingDataset': 'streaming', 'ShardError': 'streaming', 'build_streaming_dataloader': 'streaming',
    'superbatch_size': 'streaming', 'RemoteAccessError': 'remote',
    # Fashion-MNIST demo set
    'FashionMNISTCaptions': 'fashion_mnist', 'WebNoise': 'fashion_mnist', 'fashion_mnist_classnames': 'fashion_mnist',
    # its web-like variant with a long tail, attributes and a curated subset (learning-efficiency benchmark)
    'FashionWebCaptions': 'fashion_web', 'LongTail': 'fashion_web', 'Attributes': 'fashion_web',
}

__all__ = ['ShapesDataset', 'shape_classnames', 'shapes_dataloader', *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f'composer_jest.data.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
