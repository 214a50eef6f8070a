"""Source (d): parquet files of image bytes or paths + captions (img2dataset's parquet output, Hugging Face
datasets; local or ``s3://``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from composer_jest.data.convert.images import check_encoding, check_scoring_side, decode_image, encode_image
from composer_jest.data.convert.rows import RowFields, parse_keep_columns, row_columns, row_sample
from composer_jest.data.convert.webdataset import expand_shards
from composer_jest.data.convert.writer import (
    BadSampleError,
    CaptionCheck,
    ConversionError,
    ConvertSummary,
    MDSOptions,
    Record,
    write_mds,
)
from composer_jest.data.remote import RemoteAccessError, is_remote, open_s3_object

__all__ = ['PARQUET_SUFFIXES', 'PARQUET_IMAGE_COLUMNS', 'PARQUET_CAPTION_COLUMNS', 'convert_parquet']

PARQUET_SUFFIXES = ('.parquet',)
# Looked for in this order when image_column / caption_column are not given: img2dataset writes the image bytes
# under its encode format (`jpg`...) and the caption as `txt`; Hugging Face datasets use `image` and `text`/`caption`.
PARQUET_IMAGE_COLUMNS = ('jpg', 'jpeg', 'png', 'webp', 'image', 'img')
PARQUET_CAPTION_COLUMNS = ('txt', 'caption', 'text')
_PARQUET_BATCH_ROWS = 256


def convert_parquet(
    files: Union[str, Sequence[str]],
    out: str,
    *,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    label_column: Optional[str] = None,
    keep_columns: Union[None, str, Sequence[str]] = None,
    images_dir: Optional[str] = None,
    image_encoding: str = 'source',
    skip_bad: bool = False,
    options: Optional[MDSOptions] = None,
    captions_check: Optional[CaptionCheck] = None,
    scoring_side: Optional[int] = None,
) -> ConvertSummary:
    """Convert parquet files of image–caption rows: img2dataset's parquet output, Hugging Face datasets, your own.

    The image column holds the image bytes (img2dataset's ``jpg``), a struct ``{bytes, path}`` (Hugging Face
    ``Image`` feature: the bytes, else the path), or a path (relative to ``images_dir``, default the parquet file's
    folder; local or ``s3://``). A row whose image is null is bad, with img2dataset's ``status`` and
    ``error_message`` as the reason when the file has them (failed downloads).

    Args:
        files: parquet files, folders, globs, or ``s3://`` objects/prefixes (``s3://`` files are downloaded to a
            temporary file one at a time).
        out: output directory or ``s3://bucket/prefix``.
        image_column, caption_column: the image and caption columns; ``None``: the first present of
            :data:`PARQUET_IMAGE_COLUMNS` / :data:`PARQUET_CAPTION_COLUMNS`.
        label_column, keep_columns, image_encoding: as for :func:`convert_folder`.
        images_dir: folder (or ``s3://`` prefix) that relative image paths are read from.
        skip_bad, options: see :func:`write_mds`.
        captions_check: caption length counting/rejection (:class:`CaptionCheck`).
        scoring_side: also store a scoring thumbnail (see :func:`convert_folder`).

    Other columns go to the ``meta`` json column (binary ones are dropped). A file lacking a named column, or
    having none of the default names, is an error naming the file and its columns (not a bad row).
    """
    check_encoding(image_encoding)
    check_scoring_side(scoring_side)
    kept = parse_keep_columns(keep_columns, taken=[c for c in (image_column, caption_column, label_column) if c])
    paths = expand_shards(files, PARQUET_SUFFIXES, 'parquet file')

    def records() -> Iterator[Record]:
        for path in paths:
            base = images_dir if images_dir is not None else _parent(path)
            with _LocalParquet(path) as local:  # an s3:// file is downloaded once, removed after its rows
                parquet = _parquet_file(path, local)
                fields = _parquet_fields(path, list(parquet.schema_arrow.names), image_column, caption_column,
                                         label_column, kept, scoring_side)
                for key, row in _parquet_rows(path, parquet):
                    yield key, _parquet_loader(key, row, fields, base, image_encoding)

    total = sum(_parquet_file(p, p).metadata.num_rows for p in paths) if not any(map(is_remote, paths)) else None
    return write_mds(records(), out, row_columns(image_encoding, label_column, kept, scoring_side),
                     skip_bad=skip_bad, options=options, total=total, captions=captions_check)


def _parquet_fields(path: str, columns: list[str], image: Optional[str], caption: Optional[str],
                    label: Optional[str], kept: dict[str, str], scoring_side: Optional[int] = None) -> RowFields:
    """The row fields of one parquet file: named columns must exist, default ones are looked up in its schema."""
    fields = RowFields(_pick_column(path, columns, image, PARQUET_IMAGE_COLUMNS, 'image'),
                        _pick_column(path, columns, caption, PARQUET_CAPTION_COLUMNS, 'caption'), label, kept,
                        scoring_side)
    missing = [c for c in (label, *kept) if c and c not in columns]
    if missing:  # every row would be bad: not skippable
        raise ConversionError(f'{path}: missing column(s) {missing}; its columns: {columns}')
    if fields.image in kept or fields.caption in kept:
        raise ConversionError(f'{path}: keep_columns cannot keep the image/caption columns '
                              f'{fields.image!r}/{fields.caption!r}')
    return fields


def _parent(path: str) -> str:
    return path.rsplit('/', 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def _pick_column(path: str, columns: list[str], given: Optional[str], candidates: Sequence[str], what: str) -> str:
    if given is not None:
        if given not in columns:
            raise ConversionError(f'{path}: no {what} column {given!r}; its columns: {columns}')
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ConversionError(f'{path}: no {what} column among the defaults {list(candidates)}; its columns: '
                              f'{columns} (name it with {what}_column / --{what}-column)')
    return found


class _LocalParquet:
    """A parquet file as a local path: ``s3://`` objects are downloaded to a temporary file, removed on exit."""

    def __init__(self, path: str):
        self.path, self._tmp = path, None

    def __enter__(self) -> str:
        if not is_remote(self.path):
            return self.path
        import tempfile

        from composer_jest.data.remote import download_s3_file

        self._tmp = tempfile.mkdtemp(prefix='convert-parquet-')
        local = os.path.join(self._tmp, 'part.parquet')
        download_s3_file(self.path, local)
        return local

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _parquet_file(path: str, local: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(local)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise ConversionError(f'{path}: unreadable parquet file ({type(e).__name__}: {e})') from None


def _parquet_rows(path: str, parquet: Any) -> Iterator[tuple[str, dict]]:
    """``(key, row)`` of one file, read in batches of rows; a damaged file names itself."""
    import pyarrow as pa

    row_number = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                key = f'{path}:row {row_number}' + (f' (key {row["key"]})' if row.get('key') is not None else '')
                row_number += 1
                yield key, row
    except (OSError, pa.ArrowException) as e:
        raise ConversionError(f'{path}: unreadable parquet data after row {row_number} '
                              f'({type(e).__name__}: {e})') from None


def _parquet_loader(key: str, row: dict, fields: RowFields, base: str, image_encoding: str) -> Callable[[], dict]:
    def load() -> dict:
        value = row[fields.image]
        if isinstance(value, dict):  # Hugging Face Image feature: {bytes, path}
            value = value.get('bytes') if value.get('bytes') is not None else value.get('path')
        if value is None:
            status = row.get('status')
            reason = f'no image (column {fields.image!r} is null)'
            if status is not None and status != 'success':  # img2dataset: the download failed
                reason += f'; img2dataset status {status!r}: {row.get("error_message")}'
            raise BadSampleError(key, reason)
        if isinstance(value, str):
            where = _image_location(value, base)
            key_image = f'{key} ({where})'
            raw = _read_image_file(key_image, where)
        else:
            key_image, raw = key, bytes(value)
        image = decode_image(key_image, data=raw)
        return row_sample(key, row, encode_image(image, raw, image_encoding), fields, key_image, decoded=image)
    return load


def _image_location(path: str, base: str) -> str:
    if is_remote(path) or os.path.isabs(path):
        return path
    return f'{base.rstrip("/")}/{path}' if is_remote(base) else os.path.join(base, path)


def _read_image_file(key: str, where: str) -> bytes:
    if not where.startswith('s3://'):
        try:
            return Path(where).read_bytes()
        except OSError as e:
            raise BadSampleError(key, f'image file not found or unreadable ({type(e).__name__})') from None
    try:
        stream = open_s3_object(where)
    except RemoteAccessError as e:
        raise BadSampleError(key, f'image object unreadable ({e})') from None
    try:
        return stream.read()
    finally:
        stream.close()


