"""Source (a): an image folder described by a CSV or JSONL captions file."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from composer_jest.data.convert.images import (
    check_encoding,
    check_scoring_side,
    decode_image,
    encode_image,
    keeps_source_bytes,
)
from composer_jest.data.convert.rows import RowFields, parse_keep_columns, row_sample
from composer_jest.data.convert.writer import (
    BadSampleError,
    CaptionCheck,
    ConversionError,
    ConvertSummary,
    MDSOptions,
    write_mds,
)

__all__ = ['convert_folder']


def convert_folder(
    captions: Union[str, os.PathLike],
    out: str,
    *,
    images_dir: Optional[Union[str, os.PathLike]] = None,
    image_column: str = 'file_name',
    caption_column: str = 'caption',
    label_column: Optional[str] = None,
    keep_columns: Union[None, str, Sequence[str]] = None,
    image_encoding: str = 'source',
    encoding: str = 'utf-8',
    skip_bad: bool = False,
    options: Optional[MDSOptions] = None,
    captions_check: Optional[CaptionCheck] = None,
    scoring_side: Optional[int] = None,
) -> ConvertSummary:
    """Convert an image folder described by a CSV or JSONL captions file.

    Args:
        captions: ``.csv`` (with a header) or ``.jsonl`` file; one row per image.
        out: output directory or ``s3://bucket/prefix``.
        images_dir: folder the image paths are relative to (default: the captions file's folder).
        image_column, caption_column: names of the image path and caption fields.
        label_column: optional integer class label field (written as ``label``).
        keep_columns: numeric fields kept as columns of their own (``'clean:int,score'``, see
            :func:`parse_keep_columns`): they reach the training batch as tensors (e.g. JEST's ``track_keys``). A
            value that is not a number (not an integer for ``:int``) makes the row bad, naming file:line and column.
        image_encoding: ``'source'`` (default: JPEG and PNG files stored byte for byte, other formats as lossless
            PNG), ``'jpeg'`` (JPEG files copied as is, others re-encoded, lossy), ``'png'`` or ``'bytes'`` (the
            original file, any format PIL reads).
        encoding: text encoding of the captions file (e.g. ``'latin-1'``, ``'utf-8-sig'``).
        skip_bad, options: see :func:`write_mds`.
        captions_check: caption length counting/rejection (:class:`CaptionCheck`).
        scoring_side: also store a JPEG thumbnail with this shortest side in an ``image_scoring`` column: two-stage
            decoding's stage 1 then decodes it instead of the full file (see :mod:`composer_jest.data.two_stage`;
            use the scoring side, e.g. 112 for ViT-B/16 scored at patch 32).

    Other fields of a row go to the ``meta`` json column (which does not reach the batch).
    """
    check_encoding(image_encoding)  # an unknown encoding fails before any file is read
    check_scoring_side(scoring_side)
    kept = parse_keep_columns(keep_columns, taken=[c for c in (image_column, caption_column, label_column) if c])
    captions = Path(captions)
    images_dir = Path(images_dir) if images_dir is not None else captions.parent
    if not captions.is_file():
        raise FileNotFoundError(f'captions file not found: {captions}')
    if not images_dir.is_dir():
        raise FileNotFoundError(f'images folder not found: {images_dir}')
    rows, total = _caption_rows(captions, encoding, image_column, caption_column, label_column, *kept)
    fields = RowFields(image_column, caption_column, label_column, kept, scoring_side)
    records = ((key, _folder_loader(key, row, images_dir, fields, image_encoding)) for key, row in rows)
    return write_mds(records, out, fields.columns(image_encoding), skip_bad=skip_bad, options=options, total=total,
                     captions=captions_check)


def _caption_rows(captions: Path, encoding: str, *required: Optional[str]) -> tuple[Iterator[tuple[str, Any]], int]:
    """``(key, row)`` of the captions file (``key`` = ``file:line``; a row that is not valid JSON is the
    :class:`BadSampleError` to raise when loaded) and their number; ``required`` CSV columns must be in the header."""
    suffix = captions.suffix.lower()
    if suffix == '.csv':
        return _csv_rows(captions, encoding, *required)
    if suffix in ('.jsonl', '.json'):
        return _jsonl_rows(captions, encoding)
    raise ValueError(f'captions must be a .csv or .jsonl file, got {captions}')


def _folder_loader(key: str, row: Any, images_dir: Path, fields: RowFields, image_encoding: str) -> Callable[[], dict]:
    """``load()`` of one captions-file row: read and decode its image file, then the row's fields."""
    def load() -> dict:
        if isinstance(row, Exception):
            raise row
        for name in (fields.image, fields.caption):
            if name not in row:
                raise BadSampleError(key, f'missing column {name!r} (has {sorted(row)})')
        rel = str(row[fields.image] or '').strip()
        if not rel:
            raise BadSampleError(key, f'empty {fields.image!r}')
        path = images_dir / rel
        image = decode_image(f'{key} ({path})', path=path)
        raw = path.read_bytes() if keeps_source_bytes(image_encoding) else None
        return row_sample(key, row, encode_image(image, raw, image_encoding), fields, f'{key} ({path})', decoded=image)
    return load


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded; a decoding error names the file, the line and the ``encoding`` option."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except LookupError:
        raise ValueError(f'unknown text encoding {encoding!r} (e.g. utf-8, utf-8-sig, latin-1, cp1252)') from None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ConversionError(
            f'{path}:{line}: not valid {encoding} text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); '
            'pass the file\'s encoding: encoding=... / --encoding latin-1 (or cp1252, utf-16...)',
        ) from None


def _csv_rows(path: Path, encoding: str, *required: Optional[str]) -> tuple[Iterator[tuple[str, Any]], int]:
    reader = csv.DictReader(io.StringIO(_read_text(path, encoding), newline=''))
    header = reader.fieldnames or []
    missing = [c for c in required if c is not None and c not in header]
    if missing:  # every row would be bad: not skippable
        raise ConversionError(f'{path}: missing column(s) {missing}; the header has {header}')
    rows = list(reader)
    # csv line numbers: header is line 1
    return ((f'{path}:{i + 2}', row) for i, row in enumerate(rows)), len(rows)


def _jsonl_rows(path: Path, encoding: str) -> tuple[Iterator[tuple[str, Any]], int]:
    lines = [(i + 1, line) for i, line in enumerate(_read_text(path, encoding).splitlines()) if line.strip()]

    def rows() -> Iterator[tuple[str, Any]]:
        for lineno, line in lines:
            key = f'{path}:{lineno}'
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError('not a JSON object')
                yield key, row
            except ValueError as e:
                yield key, BadSampleError(key, f'invalid JSON line ({e})')
    return rows(), len(lines)

