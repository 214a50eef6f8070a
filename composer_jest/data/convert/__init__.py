"""Convert image–caption sources to MDS shards (``composer-jest convert``), locally or to ``s3://``.

One module per source, all over one writer:

- :mod:`.writer` — the shared MDS writer: :func:`write_mds` (conversions: checked samples, ``skip_bad``,
  ``index``), :func:`write_rows` (rows as they are, e.g. ``composer-jest filter``), atomic publish, summary;
- :mod:`.folder` — an image folder with a CSV/JSONL captions file;
- :mod:`.webdataset` — webdataset tar shards (img2dataset/DataComp layout, local or ``s3://``);
- :mod:`.parquet` — parquet files of image bytes or paths + captions (img2dataset's parquet output, Hugging Face
  datasets; local or ``s3://``);
- :mod:`.demo` — the built-in demo sets (procedural shapes, Fashion-MNIST);
- :mod:`.images` / :mod:`.rows` — the image column and the table-row fields the sources share;
- :mod:`.cli` — the command line.

Every conversion writes the same columns with :class:`streaming.MDSWriter` (compression, per-shard
hashes, uploads to the object store): ``image`` (``bytes`` holding the source file when it is JPEG/PNG and a
lossless PNG otherwise — the default ``image_encoding='source'`` —, the ``jpeg``/``png`` MDS encodings, or
``bytes`` of any original file), ``caption`` (str), ``index`` (int, ``0..n-1`` over written samples, in source
order), optional ``label``/``clean`` (int), the numeric ``keep_columns`` (``int``/``float64``: tensors in the
training batch, e.g. for JEST's ``track_keys``) and ``meta`` (json: any other fields of the source; it never
reaches the batch). Bad input — unreadable image, empty caption, missing column — raises :class:`BadSampleError`
naming the file/key, unless ``skip_bad`` is set: then the sample is skipped and counted in the returned
:class:`ConvertSummary` (also written as ``convert_summary.json`` next to the shards), which also counts
empty captions and captions longer than the text context (optionally rejected).

Conversions are atomic: a dataset is written to a staging place and replaces the one at ``out`` only
after it is complete. Locally the staging directory (a sibling of ``out``) is renamed into place; on
``s3://`` the shards go under a fresh ``out/<generation>/`` prefix, ``out/index.json`` (pointing at
them) is written last, in one PUT, and the previous dataset's objects are deleted only after it. A
failed ``--overwrite`` therefore leaves the previous dataset readable, and a failed conversion never
leaves a readable ``index.json`` describing a partial one.
"""

from composer_jest.data.convert.cli import _parser, main
from composer_jest.data.convert.demo import DEMOS, convert_demo, convert_fashion_mnist, convert_shapes
from composer_jest.data.convert.folder import convert_folder
from composer_jest.data.convert.images import IMAGE_ENCODINGS, SOURCE_FORMATS
from composer_jest.data.convert.parquet import (
    PARQUET_CAPTION_COLUMNS,
    PARQUET_IMAGE_COLUMNS,
    PARQUET_SUFFIXES,
    convert_parquet,
)
from composer_jest.data.convert.rows import KEEP_TYPES, parse_keep_columns
from composer_jest.data.convert.webdataset import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TAR_SUFFIXES,
    convert_webdataset,
    expand_shards,
)
from composer_jest.data.convert.writer import (
    DEFAULT_HASHES,
    EMPTY_CAPTION,
    SUMMARY_FILE,
    BadSampleError,
    CaptionCheck,
    ConversionError,
    ConvertSummary,
    MDSOptions,
    Record,
    write_mds,
    write_rows,
)

__all__ = [
    'IMAGE_ENCODINGS', 'SOURCE_FORMATS', 'KEEP_TYPES', 'DEFAULT_HASHES', 'EMPTY_CAPTION', 'SUMMARY_FILE', 'DEMOS',
    'IMAGE_EXTENSIONS', 'CAPTION_EXTENSIONS', 'TAR_SUFFIXES', 'PARQUET_SUFFIXES', 'PARQUET_IMAGE_COLUMNS',
    'PARQUET_CAPTION_COLUMNS', 'BadSampleError', 'CaptionCheck', 'ConversionError', 'ConvertSummary', 'MDSOptions',
    'Record', 'parse_keep_columns', 'expand_shards', 'convert_folder', 'convert_webdataset', 'convert_parquet',
    'convert_shapes', 'convert_fashion_mnist', 'convert_demo', 'write_mds', 'write_rows', 'main', '_parser',
]
