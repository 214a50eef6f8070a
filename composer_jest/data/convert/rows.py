"""Rows of a table (CSV/JSONL line, parquet row) -> one sample: caption, optional ``label``, the numeric columns
kept with ``keep_columns``, and the ``meta`` json column holding every other field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from PIL import Image

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, INDEX_KEY, LABEL_KEY, TEXT_KEY
from composer_jest.data.convert.images import check_encoding
from composer_jest.data.convert.writer import EMPTY_CAPTION, BadSampleError
from composer_jest.data.two_stage import SCORING_COLUMN, scoring_thumbnail

__all__ = ['KEEP_TYPES', 'parse_keep_columns', 'numeric_field', 'RowFields', 'row_columns', 'row_sample']

KEEP_TYPES = {'float': 'float64', 'int': 'int'}  # --keep-columns NAME[:float|:int] -> MDS encoding
# Columns every conversion owns (or batch keys the reader makes): --keep-columns cannot take these names.
_RESERVED = ('image', 'caption', 'meta', INDEX_KEY, LABEL_KEY, TEXT_KEY, SCORING_COLUMN, *CACHED_REFERENCE_KEYS)


def parse_keep_columns(spec: Union[None, str, Sequence[str]], taken: Sequence[str] = ()) -> dict[str, str]:
    """``'clean:int,score'`` (or a list) -> ``{name: MDS encoding}``: ``float64`` unless ``:int`` is given.

    ``taken`` are source fields the conversion already uses (image/caption/label columns). Reserved names
    (the columns every conversion writes and the batch keys the reader makes) are refused.

    Example:
        >>> parse_keep_columns('clean:int, score')
        {'clean': 'int', 'score': 'float64'}
        >>> parse_keep_columns('text')
        Traceback (most recent call last):
        ...
        ValueError: keep_columns: 'text' is reserved (image, caption, meta, index, label, text, image_scoring, ref_image_features, ref_text_features, ref_logit_scale, ref_logit_bias); the label column is written with label_column / --label-column
    """  # noqa: E501
    items = spec.split(',') if isinstance(spec, str) else list(spec or ())
    kept: dict[str, str] = {}
    for item in (i.strip() for i in items if i.strip()):
        name, _, kind = item.partition(':')
        name, kind = name.strip(), kind.strip() or 'float'
        if kind not in KEEP_TYPES:
            raise ValueError(f'keep_columns: {item!r} has type {kind!r}; write NAME, NAME:float or NAME:int')
        if name in _RESERVED:
            raise ValueError(f'keep_columns: {name!r} is reserved ({", ".join(_RESERVED)}); the label column is '
                             'written with label_column / --label-column')
        if name in taken:
            raise ValueError(f'keep_columns: {name!r} is already used as the image, caption or label column')
        kept[name] = KEEP_TYPES[kind]
    return kept


def numeric_field(key: str, row: dict, name: str, encoding: str) -> Union[int, float]:
    """``row[name]`` as a finite number of the kept column's type; else the row is bad (naming the column)."""
    if name not in row:
        raise BadSampleError(key, f'missing column {name!r} (has {sorted(row)})')
    value = row[name]
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # bools are 0/1
        if not math.isfinite(number):
            raise ValueError
        if encoding != 'int':
            return number
        if isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r'\s*[+-]?\d+\s*', value)):
            return int(value)  # exact, also beyond 2**53
        if not number.is_integer():
            raise ValueError
        return int(number)
    except (TypeError, ValueError):
        kind = 'an integer' if encoding == 'int' else 'a finite number'
        raise BadSampleError(key, f'column {name!r} is not {kind}: {value!r} (--keep-columns keeps numeric '
                                  'columns)') from None




@dataclass
class RowFields:
    """Which fields of a source row (CSV/JSONL line, parquet row) become which columns; the rest go to ``meta``."""

    image: str
    caption: str
    label: Optional[str]
    kept: dict[str, str]
    scoring_side: Optional[int] = None  # also a scoring thumbnail column (two-stage decoding's stage 1)

    def used(self) -> set[str]:
        return {self.image, self.caption, *([self.label] if self.label else []), *self.kept}

    def columns(self, image_encoding: str) -> dict[str, str]:
        """The MDS columns of a conversion writing these fields."""
        return row_columns(image_encoding, self.label, self.kept, self.scoring_side)


def row_columns(image_encoding: str, label: Optional[str], kept: dict[str, str],
                 scoring_side: Optional[int] = None) -> dict[str, str]:
    """The MDS columns of a conversion of rows: image, caption, meta, the kept columns, ``label`` if given, the
    scoring thumbnail if ``scoring_side`` is."""
    columns = {'image': check_encoding(image_encoding), 'caption': 'str', 'meta': 'json', **kept}
    if label is not None:
        columns['label'] = 'int'
    if scoring_side is not None:
        columns[SCORING_COLUMN] = 'bytes'
    return columns


def row_sample(key: str, row: dict, image: Any, fields: RowFields, image_key: Optional[str] = None,
                decoded: Optional[Image.Image] = None) -> dict:
    """The sample of a row whose image is already read: caption, ``label``, kept numeric columns, ``meta``, and the
    scoring thumbnail of the ``decoded`` image when ``fields.scoring_side`` is set.

    Bad values raise :class:`BadSampleError` naming ``key`` (``image_key``, naming the image too, for the caption).
    """
    caption = row[fields.caption]
    if not isinstance(caption, str) or not caption.strip():
        raise BadSampleError(image_key or key, f'{EMPTY_CAPTION} in column {fields.caption!r}')
    used = fields.used()
    sample = {'image': image, 'caption': caption,
              'meta': {k: _json_value(v) for k, v in row.items() if k not in used and not isinstance(v, bytes)}}
    if fields.label is not None:
        sample['label'] = _int_field(key, row, fields.label)
    sample.update({name: numeric_field(key, row, name, enc) for name, enc in fields.kept.items()})
    if fields.scoring_side is not None:
        sample[SCORING_COLUMN] = scoring_thumbnail(decoded, fields.scoring_side)
    return sample


def _json_value(value: Any) -> Any:
    """``value`` if json can hold it (nested lists/dicts too), else its ``str`` (dates, decimals of parquet)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


def _int_field(key: str, row: dict, name: str) -> int:
    if name not in row:
        raise BadSampleError(key, f'missing column {name!r} (has {sorted(row)})')
    try:
        return int(row[name])
    except (TypeError, ValueError):
        raise BadSampleError(key, f'column {name!r} is not an integer: {row[name]!r}') from None

