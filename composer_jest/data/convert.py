"""Convert image–caption sources to MDS shards (``composer-jest convert``), locally or to ``s3://``.

Sources: an image folder with a CSV/JSONL captions file, webdataset tar shards (img2dataset/DataComp
layout, local or ``s3://``), parquet files of image bytes or paths + captions (img2dataset's parquet output,
Hugging Face datasets; local or ``s3://``), and the built-in demo sets (procedural shapes, Fashion-MNIST).

Every conversion writes the same columns with :class:`streaming.MDSWriter` (compression, per-shard
hashes, uploads to the object store): ``image`` (``bytes`` holding the source file when it is JPEG/PNG and a
lossless PNG otherwise — the default ``image_encoding='source'`` —, the ``jpeg``/``png`` MDS encodings, or
``bytes`` of any original file), ``caption`` (str), ``index`` (int, ``0..n-1`` over written samples, in source
order), optional ``label``/``clean`` (int), the numeric ``keep_columns`` (``int``/``float64``: tensors in the
training batch, e.g. for JEST's ``track_keys``) and ``meta`` (json: any other fields of the source; it never
reaches the batch). Bad input —
unreadable image, empty caption, missing column — raises :class:`BadSampleError` naming the file/key,
unless ``skip_bad`` is set: then the sample is skipped and counted in the returned
:class:`ConvertSummary` (also written as ``convert_summary.json`` next to the shards), which also counts
empty captions and captions longer than the text context (optionally rejected).

Conversions are atomic: a dataset is written to a staging place and replaces the one at ``out`` only
after it is complete. Locally the staging directory (a sibling of ``out``) is renamed into place; on
``s3://`` the shards go under a fresh ``out/<generation>/`` prefix, ``out/index.json`` (pointing at
them) is written last, in one PUT, and the previous dataset's objects are deleted only after it. A
failed ``--overwrite`` therefore leaves the previous dataset readable, and a failed conversion never
leaves a readable ``index.json`` describing a partial one.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image

from composer_jest.core.batch import CACHED_REFERENCE_KEYS, INDEX_KEY, LABEL_KEY, TEXT_KEY
from composer_jest.data.remote import (
    RemoteAccessError,
    check_s3_prefix,
    delete_s3_object,
    describe_remote_error,
    is_remote,
    list_s3_objects,
    open_s3_object,
    s3_client,
    split_s3_url,
)
from composer_jest.data.two_stage import SCORING_COLUMN, scoring_thumbnail

__all__ = [
    'IMAGE_ENCODINGS', 'DEFAULT_HASHES', 'DEMOS', 'BadSampleError', 'CaptionCheck', 'ConversionError', 'ConvertSummary',
    'MDSOptions', 'parse_keep_columns', 'convert_folder', 'convert_webdataset', 'convert_parquet', 'convert_shapes',
    'convert_fashion_mnist', 'convert_demo', 'write_mds', 'main',
]

IMAGE_ENCODINGS = ('source', 'jpeg', 'png', 'bytes')
SOURCE_FORMATS = ('JPEG', 'PNG')  # kept byte for byte by image_encoding='source'; other formats become PNG
KEEP_TYPES = {'float': 'float64', 'int': 'int'}  # --keep-columns NAME[:float|:int] -> MDS encoding
# Columns every conversion owns (or batch keys the reader makes): --keep-columns cannot take these names.
_RESERVED = ('image', 'caption', 'meta', INDEX_KEY, LABEL_KEY, TEXT_KEY, SCORING_COLUMN, *CACHED_REFERENCE_KEYS)
DEFAULT_HASHES = ('sha1', 'xxh64')
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
CAPTION_EXTENSIONS = ('txt', 'caption')
SUMMARY_FILE = 'convert_summary.json'
_MAX_LISTED_SKIPS = 20
EMPTY_CAPTION = 'empty caption'  # the reason of a bad sample counted in ConvertSummary.empty_captions
_GENERATION_PREFIX = 'v-'  # s3:// shards of one conversion live under out/v-<time>-<id>/


class ConversionError(ValueError):
    """The input cannot be converted (names the file or key at fault)."""


class BadSampleError(ConversionError):
    """One sample is bad (unreadable image, empty caption, missing field); skippable with ``skip_bad``."""

    def __init__(self, key: str, reason: str):
        super().__init__(f'{key}: {reason} (pass skip_bad=True / --skip-bad to skip and count such samples)')
        self.key, self.reason = key, reason


@dataclass
class MDSOptions:
    """How shards are written (see :class:`streaming.MDSWriter`).

    Args:
        compression: shard compression (``'zstd'``, ``None``…).
        hashes: per-shard hashes recorded in ``index.json`` (checked on read with ``validate_hash``).
        size_limit: shard size before compression, bytes or ``'64mb'``-style.
        overwrite: replace an existing dataset at ``out`` instead of failing.
        progress: show a progress bar (stderr).
    """

    compression: Optional[str] = 'zstd'
    hashes: Sequence[str] = DEFAULT_HASHES
    size_limit: Union[int, str] = 1 << 26
    overwrite: bool = False
    progress: bool = True


@dataclass
class ConvertSummary:
    """What a conversion wrote: ``written`` samples (indices ``0..written-1``) and ``skipped`` bad ones."""

    out: str
    written: int
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # 'key: reason', the first few
    columns: dict[str, str] = field(default_factory=dict)
    empty_captions: int = 0  # samples with an empty caption (bad: skipped with skip_bad, else an error)
    long_captions: int = 0  # captions over caption_context tokens (truncated when trained on, or rejected)
    caption_context: Optional[int] = None
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f'wrote {self.written} samples to {self.out} in {self.seconds:.1f}s; skipped {self.skipped} bad']
        if self.empty_captions:
            lines.append(f'  {self.empty_captions} empty caption(s)')
        if self.long_captions:
            lines.append(f'  {self.long_captions} caption(s) longer than {self.caption_context} tokens')
        lines += [f'  skipped {s}' for s in self.skipped_examples]
        if self.skipped > len(self.skipped_examples):
            lines.append(f'  ... and {self.skipped - len(self.skipped_examples)} more')
        return '\n'.join(lines)


# A source yields (key, load) pairs: `load()` returns the sample dict or raises BadSampleError.
Record = tuple[str, Callable[[], dict]]


@dataclass
class CaptionCheck:
    """How captions are measured: ``context`` tokens (open_clip's CLIP BPE, start and end tokens included;
    ``None``: not measured) and whether longer captions are bad samples (``reject_long``) or only counted."""

    context: Optional[int] = 77
    reject_long: bool = False

    def is_long(self, caption: str) -> bool:
        if self.context is None:
            return False
        return len(_bpe().encode(caption)) + 2 > self.context


def _bpe() -> Any:
    global _BPE
    if _BPE is None:
        from open_clip.tokenizer import SimpleTokenizer

        _BPE = SimpleTokenizer()
    return _BPE


_BPE: Any = None


# -- the writer ------------------------------------------------------------------------------------------
def write_mds(
    records: Iterable[Record],
    out: str,
    columns: dict[str, str],
    *,
    skip_bad: bool = False,
    options: Optional[MDSOptions] = None,
    total: Optional[int] = None,
    captions: Optional[CaptionCheck] = None,
) -> ConvertSummary:
    """Write samples to MDS at ``out`` (a directory or ``s3://bucket/prefix``), numbering them ``index``.

    The dataset replaces the one at ``out`` (with ``overwrite``) only once it is complete (see the module
    docstring); a failure leaves ``out`` as it was.

    Args:
        records: ``(key, load)`` pairs; ``load()`` returns a dict with ``image`` and ``caption`` (and any of
            ``columns``) or raises :class:`BadSampleError`.
        out: output directory or object-store URL.
        columns: MDS column encodings (``index`` is added).
        skip_bad: skip and count bad samples instead of raising.
        options: :class:`MDSOptions`.
        total: number of records, for the progress bar.
        captions: how over-long captions are counted or rejected (default: counted at 77 tokens).
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    options = options or MDSOptions()
    captions = captions or CaptionCheck()
    out = str(out)
    columns = {**columns, 'index': 'int'}
    _check_output(out, options.overwrite)
    start = time.perf_counter()
    staging = _staging(out)
    writer = MDSWriter(out=staging, columns=columns, compression=options.compression,
                       hashes=sorted(options.hashes), size_limit=options.size_limit,
                       exist_ok=staging == out and options.overwrite, progress_bar=False)
    summary = ConvertSummary(out=out, written=0, columns=columns, caption_context=captions.context)
    try:
        with tqdm(total=total, desc=f'convert -> {out}', unit=' samples', disable=not options.progress,
                  file=sys.stderr) as bar:
            for key, load in records:
                bar.update(1)
                try:
                    sample = _check_sample(key, load(), columns, captions, summary)
                except BadSampleError as e:
                    summary.empty_captions += e.reason.startswith(EMPTY_CAPTION)
                    if not skip_bad:
                        raise
                    summary.skipped += 1
                    if len(summary.skipped_examples) < _MAX_LISTED_SKIPS:
                        summary.skipped_examples.append(f'{e.key}: {e.reason}')
                    continue
                sample['index'] = summary.written
                writer.write(sample)
                summary.written += 1
        if summary.written == 0:
            raise ConversionError(f'no samples written to {out} ({summary.skipped} skipped as bad)')
        summary.seconds = time.perf_counter() - start
        if not out.startswith('s3://'):
            _write_summary(writer, summary)
        writer.finish()
        _publish(out, staging, summary)
    except BaseException as e:
        _abort(writer, out, staging)
        if isinstance(e, (ConversionError, KeyboardInterrupt)):
            raise
        err = describe_remote_error(e, out, 'write') if is_remote(out) else None
        if err is not None:
            raise err from None
        if is_remote(out) and 'threads failed' in str(e):  # streaming's upload threads report this only
            raise RemoteAccessError(f'uploading shards to {out} failed (see the upload traceback above)') from e
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _check_output(out: str, overwrite: bool) -> None:
    hint = 'pass overwrite=True / --overwrite to replace it'
    if out.startswith('s3://'):
        if check_s3_prefix(out, for_write=True) and not overwrite:
            raise FileExistsError(f'{out} already holds an MDS dataset (index.json); {hint}')
    elif not is_remote(out) and os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f'{out} exists and is not a directory')
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f'{out} exists and is not empty; {hint}')


def _staging(out: str) -> str:
    """Where the dataset is written before it replaces ``out``: a sibling directory, or ``out/<generation>``."""
    generation = f'{time.strftime("%Y%m%d-%H%M%S")}-{uuid.uuid4().hex[:8]}'
    if out.startswith('s3://'):
        return f'{out.rstrip("/")}/{_GENERATION_PREFIX}{generation}'
    if is_remote(out):  # other object stores: written in place (not atomic)
        return out
    path = Path(out).absolute()
    return str(path.with_name(f'.{path.name}.partial-{generation}'))


def _publish(out: str, staging: str, summary: ConvertSummary) -> None:
    """Make the complete dataset at ``staging`` the one at ``out`` (the commit point of a conversion)."""
    if staging == out:
        return
    if not out.startswith('s3://'):
        old = None
        if os.path.lexists(out):
            old = _staging(out).replace('.partial-', '.old-')
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    client = s3_client()
    bucket, prefix = split_s3_url(out)
    key = lambda name: f'{prefix.rstrip("/")}/{name}' if prefix.strip('/') else name  # noqa: E731
    generation = staging.rstrip('/').rsplit('/', 1)[-1]
    index = json.loads(client.get_object(Bucket=bucket, Key=key(f'{generation}/index.json'))['Body'].read())
    for shard in index['shards']:
        for part in ('raw_data', 'zip_data'):
            if shard.get(part):
                shard[part]['basename'] = f'{generation}/{shard[part]["basename"]}'
    old = _s3_json(client, bucket, key('index.json'))
    summary_json = json.dumps({k: v for k, v in asdict(summary).items() if k != 'seconds'}, indent=1)
    client.put_object(Bucket=bucket, Key=key(SUMMARY_FILE), Body=summary_json.encode())
    client.put_object(Bucket=bucket, Key=key('index.json'), Body=json.dumps(index).encode())  # the commit
    keep = {p['basename'] for shard in index['shards'] for p in (shard['raw_data'], shard.get('zip_data')) if p}
    stale = {p['basename'] for shard in (old or {}).get('shards', [])
             for p in (shard.get('raw_data'), shard.get('zip_data')) if p} - keep
    for name in sorted(stale) + [f'{generation}/index.json']:
        try:
            client.delete_object(Bucket=bucket, Key=key(name))
        except Exception as e:  # the new dataset is in place: a leftover object is only wasted space
            warnings.warn(f'could not delete the old object s3://{bucket}/{key(name)} ({type(e).__name__})',
                          UserWarning, stacklevel=2)


def _s3_json(client: Any, bucket: str, key: str) -> Optional[dict]:
    try:
        return json.loads(client.get_object(Bucket=bucket, Key=key)['Body'].read())
    except client.exceptions.NoSuchKey:
        return None
    except ValueError:  # a corrupt old index: nothing of it can be read (or deleted by name)
        return None


def _check_sample(key: str, sample: dict, columns: dict[str, str], captions: CaptionCheck,
                  summary: ConvertSummary) -> dict:
    caption = sample.get('caption')
    if not isinstance(caption, str) or not caption.strip():
        raise BadSampleError(key, EMPTY_CAPTION)
    if sample.get('image') is None:
        raise BadSampleError(key, 'no image')
    sample['caption'] = caption.strip()
    if captions.is_long(sample['caption']):
        summary.long_captions += 1
        if captions.reject_long:
            raise BadSampleError(key, f'caption longer than {captions.context} tokens (reject_long is set)')
    unknown = set(sample) - set(columns)
    if unknown:  # a programming error in a source, not bad data
        raise ValueError(f'{key}: sample fields {sorted(unknown)} are not among the columns {sorted(columns)}')
    return sample


def _write_summary(writer: Any, summary: ConvertSummary) -> None:
    """Record the counts next to the shards, so a short dataset is visibly short."""
    with open(os.path.join(writer.local, SUMMARY_FILE), 'w') as f:
        json.dump({k: v for k, v in asdict(summary).items() if k != 'seconds'}, f, indent=1)
    if writer.remote:
        writer.cloud_writer.upload_file(SUMMARY_FILE)


def _abort(writer: Any, out: str, staging: str) -> None:
    """Drop a failed conversion's staged files; ``out`` is untouched (unless written in place)."""
    writer.cancel_future_jobs()
    if writer.remote or staging != out:
        shutil.rmtree(writer.local, ignore_errors=True)
    if staging.startswith('s3://') and staging != out:
        try:
            for url in list_s3_objects(staging.rstrip('/') + '/'):
                delete_s3_object(url)
        except Exception:  # the store may be what failed: the staged objects are unreferenced, only wasted space
            warnings.warn(f'could not delete the partial conversion at {staging}', UserWarning, stacklevel=2)


# -- images ------------------------------------------------------------------------------------------------
def _decode(key: str, data: Optional[bytes] = None, path: Optional[Path] = None) -> Image.Image:
    """Open and fully decode an image (truncated or corrupt files fail here, at conversion time)."""
    try:
        image = Image.open(path if path is not None else io.BytesIO(data))
        image.load()
        return image
    except FileNotFoundError:
        raise BadSampleError(key, f'image file not found: {path}') from None
    except Exception as e:
        raise BadSampleError(key, f'unreadable image ({type(e).__name__}: {e})') from None


def _encode_image(image: Image.Image, raw: Optional[bytes], encoding: str) -> Any:
    """The ``image`` column value for ``encoding``: the PIL image (MDS jpeg/png encode it) or bytes.

    ``'source'``: the source bytes of a JPEG or PNG file, else the decoded pixels as PNG bytes (lossless, first
    frame of an animation; modes PNG cannot hold become RGB). ``'bytes'``: the source bytes, any format.
    """
    if encoding == 'bytes' or (encoding == 'source' and image.format in SOURCE_FORMATS):
        return raw
    if encoding == 'source':
        out = io.BytesIO()
        _png_mode(image).save(out, format='PNG')
        return out.getvalue()
    if encoding == 'jpeg':
        # JPEG files opened from disk are copied byte for byte by streaming's JPEG encoding.
        if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
            return image
        return image.convert('RGB')
    return _png_mode(image)


def _png_mode(image: Image.Image) -> Image.Image:
    return image if image.mode in ('1', 'L', 'LA', 'P', 'RGB', 'RGBA', 'I', 'I;16') else image.convert('RGB')


def _check_scoring_side(side: Optional[int]) -> None:
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
        raise ValueError(f'scoring_side must be a positive int (the two-stage scoring side, e.g. 112) or None, '
                         f'got {side!r}')


def _check_encoding(image_encoding: str) -> str:
    """The MDS encoding of the ``image`` column for ``image_encoding`` (``source`` and ``bytes`` store bytes)."""
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f'image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}')
    return 'bytes' if image_encoding == 'source' else image_encoding


def _raw_bytes(image_encoding: str) -> bool:
    return image_encoding in ('source', 'bytes')


# -- numeric columns kept from the source ----------------------------------------------------------------
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


def _numeric_field(key: str, row: dict, name: str, encoding: str) -> Union[int, float]:
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


# -- (a) image folder + CSV/JSONL captions ---------------------------------------------------------------
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
    _check_encoding(image_encoding)  # an unknown encoding fails before any file is read
    _check_scoring_side(scoring_side)
    kept = parse_keep_columns(keep_columns, taken=[c for c in (image_column, caption_column, label_column) if c])
    captions = Path(captions)
    images_dir = Path(images_dir) if images_dir is not None else captions.parent
    if not captions.is_file():
        raise FileNotFoundError(f'captions file not found: {captions}')
    if not images_dir.is_dir():
        raise FileNotFoundError(f'images folder not found: {images_dir}')
    suffix = captions.suffix.lower()
    if suffix == '.csv':
        rows, total = _csv_rows(captions, encoding, image_column, caption_column, label_column, *kept)
    elif suffix in ('.jsonl', '.json'):
        rows, total = _jsonl_rows(captions, encoding)
    else:
        raise ValueError(f'captions must be a .csv or .jsonl file, got {captions}')
    fields = _RowFields(image_column, caption_column, label_column, kept, scoring_side)

    def record(row_key: str, row: Any) -> Record:
        def load() -> dict:
            if isinstance(row, Exception):
                raise row
            for name in (image_column, caption_column):
                if name not in row:
                    raise BadSampleError(row_key, f'missing column {name!r} (has {sorted(row)})')
            rel = str(row[image_column] or '').strip()
            if not rel:
                raise BadSampleError(row_key, f'empty {image_column!r}')
            path = images_dir / rel
            image = _decode(f'{row_key} ({path})', path=path)
            raw = path.read_bytes() if _raw_bytes(image_encoding) else None
            return _row_sample(row_key, row, _encode_image(image, raw, image_encoding), fields, f'{row_key} ({path})',
                               decoded=image)
        return row_key, load

    return write_mds((record(k, r) for k, r in rows), out, fields.columns(image_encoding), skip_bad=skip_bad,
                     options=options, total=total, captions=captions_check)


@dataclass
class _RowFields:
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
        return _row_columns(image_encoding, self.label, self.kept, self.scoring_side)


def _row_columns(image_encoding: str, label: Optional[str], kept: dict[str, str],
                 scoring_side: Optional[int] = None) -> dict[str, str]:
    """The MDS columns of a conversion of rows: image, caption, meta, the kept columns, ``label`` if given, the
    scoring thumbnail if ``scoring_side`` is."""
    columns = {'image': _check_encoding(image_encoding), 'caption': 'str', 'meta': 'json', **kept}
    if label is not None:
        columns['label'] = 'int'
    if scoring_side is not None:
        columns[SCORING_COLUMN] = 'bytes'
    return columns


def _row_sample(key: str, row: dict, image: Any, fields: _RowFields, image_key: Optional[str] = None,
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
    sample.update({name: _numeric_field(key, row, name, enc) for name, enc in fields.kept.items()})
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


# -- (b) webdataset tar shards ----------------------------------------------------------------------------
_WDS_KEY = re.compile(r'^((?:.*/|)[^./]+)[.]([^/]*)$')  # webdataset: key = path up to the first dot of the name


TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')


def expand_shards(shards: Union[str, Sequence[str]], suffixes: tuple[str, ...] = TAR_SUFFIXES,
                  kind: str = 'webdataset shard') -> list[str]:
    """Local files, folders, globs, and ``s3://`` objects or prefixes -> sorted list of the files (of a folder or
    prefix: those ending in ``suffixes``; ``kind`` names them in errors)."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    found: list[str] = []
    for item in map(str, items):
        if item.startswith('s3://'):
            matches = [item] if item.endswith(suffixes) else list_s3_objects(item, suffixes)
        elif os.path.isdir(item):
            matches = sorted(p for s in suffixes for p in glob.glob(os.path.join(item, f'*{s}')))
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
        elif os.path.isfile(item):
            matches = [item]
        else:
            raise FileNotFoundError(f'{kind} not found: {item}')
        if not matches:
            raise FileNotFoundError(f'no {"/".join(suffixes)} files found at {item}')
        found += matches
    return found


def _tar_groups(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of one tar, streamed (members of a sample are consecutive)."""
    stream = open_s3_object(shard) if shard.startswith('s3://') else open(shard, 'rb')
    key, group = None, {}
    try:
        with tarfile.open(fileobj=stream, mode='r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _WDS_KEY.match(member.name)
                if match is None or os.path.basename(member.name).startswith('.'):
                    continue
                member_key, ext = match.group(1), match.group(2).lower()
                if member_key != key and key is not None:
                    yield key, group
                    group = {}
                key = member_key
                group[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConversionError(f'{shard}: unreadable tar shard ({type(e).__name__}: {e})') from None
    finally:
        stream.close()
    if key is not None:
        yield key, group


def convert_webdataset(
    shards: Union[str, Sequence[str]],
    out: str,
    *,
    image_encoding: str = 'source',
    keep_columns: Union[None, str, Sequence[str]] = None,
    skip_bad: bool = False,
    options: Optional[MDSOptions] = None,
    captions_check: Optional[CaptionCheck] = None,
    scoring_side: Optional[int] = None,
) -> ConvertSummary:
    """Convert webdataset tar shards (``key.jpg`` + ``key.txt`` [+ ``key.json``], as img2dataset writes).

    Args:
        shards: tar files, folders of tars, globs, or ``s3://`` objects/prefixes.
        out: output directory or ``s3://bucket/prefix``.
        image_encoding: ``'source'`` (default: JPEG/PNG bytes as they are, other formats as lossless PNG),
            ``'bytes'`` (the original bytes, any format), ``'jpeg'`` or ``'png'``.
        keep_columns: numeric fields of ``key.json`` kept as columns of their own (see :func:`convert_folder`).
        skip_bad, options: see :func:`write_mds`.
        captions_check: caption length counting/rejection (:class:`CaptionCheck`).
        scoring_side: also store a scoring thumbnail (see :func:`convert_folder`).

    The rest of ``key.json`` goes to the ``meta`` column (plus ``key`` and ``shard``).
    """
    image_column_encoding = _check_encoding(image_encoding)
    _check_scoring_side(scoring_side)
    kept = parse_keep_columns(keep_columns)
    paths = expand_shards(shards)

    def records() -> Iterator[Record]:
        for shard in paths:
            for key, group in _tar_groups(shard):
                yield f'{shard}:{key}', _wds_loader(f'{shard}:{key}', key, shard, group, image_encoding, kept,
                                                    scoring_side)

    columns = {'image': image_column_encoding, 'caption': 'str', 'meta': 'json', **kept}
    if scoring_side is not None:
        columns[SCORING_COLUMN] = 'bytes'
    return write_mds(records(), out, columns, skip_bad=skip_bad, options=options, captions=captions_check)


def _wds_loader(name: str, key: str, shard: str, group: dict[str, bytes], image_encoding: str,
                kept: dict[str, str], scoring_side: Optional[int] = None) -> Callable[[], dict]:
    def load() -> dict:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        if image_ext is None:
            expected = ', .'.join(IMAGE_EXTENSIONS)
            raise BadSampleError(name, f'no image (expected one of .{expected}; has {sorted(group)})')
        caption_ext = next((e for e in CAPTION_EXTENSIONS if e in group), None)
        if caption_ext is None:
            raise BadSampleError(name, f'no caption (.txt); has {sorted(group)}')
        try:
            caption = group[caption_ext].decode('utf-8')
        except UnicodeDecodeError:
            raise BadSampleError(name, 'caption is not UTF-8') from None
        meta: dict[str, Any] = {}
        if 'json' in group:
            try:
                meta = json.loads(group['json'])
            except ValueError as e:
                raise BadSampleError(name, f'invalid .json ({e})') from None
            meta = meta if isinstance(meta, dict) else {'json': meta}
        numbers = {col: _numeric_field(f'{name}.json', meta, col, enc) for col, enc in kept.items()}
        meta = {k: v for k, v in meta.items() if k not in kept}
        meta.update(key=key, shard=shard)
        image = _decode(name, data=group[image_ext])
        scoring = {SCORING_COLUMN: scoring_thumbnail(image, scoring_side)} if scoring_side is not None else {}
        return {'image': _encode_image(image, group[image_ext], image_encoding), 'caption': caption, 'meta': meta,
                **numbers, **scoring}
    return load


# -- (d) parquet: img2dataset output, Hugging Face datasets ------------------------------------------------
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
    _check_encoding(image_encoding)
    _check_scoring_side(scoring_side)
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
    return write_mds(records(), out, _row_columns(image_encoding, label_column, kept, scoring_side),
                     skip_bad=skip_bad, options=options, total=total, captions=captions_check)


def _parquet_fields(path: str, columns: list[str], image: Optional[str], caption: Optional[str],
                    label: Optional[str], kept: dict[str, str], scoring_side: Optional[int] = None) -> _RowFields:
    """The row fields of one parquet file: named columns must exist, default ones are looked up in its schema."""
    fields = _RowFields(_pick_column(path, columns, image, PARQUET_IMAGE_COLUMNS, 'image'),
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


def _parquet_loader(key: str, row: dict, fields: _RowFields, base: str, image_encoding: str) -> Callable[[], dict]:
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
        image = _decode(key_image, data=raw)
        return _row_sample(key, row, _encode_image(image, raw, image_encoding), fields, key_image, decoded=image)
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


# -- (c) demo sets --------------------------------------------------------------------------------------
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


# -- command line ---------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (``(required)`` for required ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required and action.option_strings:
            return f'{action.help} (required)'
        return super()._get_help_string(action)


_ENCODING_HELP = ("how images are stored: 'source' keeps JPEG/PNG files byte for byte and stores other formats as "
                  "lossless PNG; 'jpeg' re-encodes non-JPEG sources (lossy); 'png' decodes and stores PNG; 'bytes' "
                  'keeps every source file as it is')
_KEEP_HELP = ('comma-separated numeric columns to keep as columns of their own, NAME (float) or NAME:int, e.g. '
              "'clean:int,score': they reach the training batch as tensors (JEST track_keys); a non-numeric value "
              'is a bad row. Other fields go to the json meta column, which never reaches the batch')


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--out', required=True, help='output directory or s3://bucket/prefix '
                        '(custom endpoint: $S3_ENDPOINT_URL; credentials from the environment)')
    common.add_argument('--compression', default='zstd', help="shard compression ('none' to disable)")
    common.add_argument('--hashes', default=','.join(DEFAULT_HASHES), help='comma-separated shard hashes')
    common.add_argument('--size-limit', default='64mb', help='shard size limit before compression')
    common.add_argument('--overwrite', action='store_true', help='replace an existing dataset at --out')
    common.add_argument('--no-progress', action='store_true', help='no progress bar')
    bad = argparse.ArgumentParser(add_help=False)
    bad.add_argument('--skip-bad', action='store_true',
                     help='skip bad samples (unreadable image, empty caption, missing field) and count them')
    bad.add_argument('--caption-context', type=int, default=77,
                     help='count captions longer than this many CLIP BPE tokens (0: do not measure)')
    bad.add_argument('--reject-long-captions', action='store_true',
                     help='treat captions longer than --caption-context as bad samples')
    bad.add_argument('--image-encoding', default='source', choices=IMAGE_ENCODINGS, help=_ENCODING_HELP)
    bad.add_argument('--keep-columns', default=None, metavar='NAME[:int],...', help=_KEEP_HELP)
    bad.add_argument('--scoring-side', type=int, default=None, metavar='S',
                     help='also store a JPEG thumbnail with shortest side S (image_scoring column) for two-stage '
                          "decoding's stage 1 (e.g. 112: ViT-B/16 scored at patch 32)")

    parser = argparse.ArgumentParser(prog='composer-jest convert', description='Convert image-caption data to MDS.',
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest='source', required=True)
    add = lambda name, parents, help: sub.add_parser(  # noqa: E731
        name, parents=parents, help=help, description=help, formatter_class=_HelpFormatter)
    p = add('folder', [common, bad], 'image folder + CSV/JSONL captions')
    p.add_argument('--captions', required=True, help='captions .csv (with header) or .jsonl')
    p.add_argument('--images', default=None, help='image folder (not given: the captions file folder)')
    p.add_argument('--image-column', default='file_name', help='column with the image path, relative to --images')
    p.add_argument('--caption-column', default='caption', help='column with the caption')
    p.add_argument('--label-column', default=None,
                   help="integer class column, written as 'label' (zero-shot evaluation needs it)")
    p.add_argument('--encoding', default='utf-8', help='text encoding of the captions file (e.g. latin-1)')
    p = add('webdataset', [common, bad], 'webdataset tar shards (local or s3://); --keep-columns reads key.json')
    p.add_argument('shards', nargs='+', help='tar files, folders, globs, s3:// objects or prefixes')
    p = add('parquet', [common, bad], 'parquet files of image bytes or paths + captions (img2dataset output, '
            'Hugging Face datasets; local or s3://)')
    p.add_argument('files', nargs='+', help='parquet files, folders, globs, s3:// objects or prefixes')
    p.add_argument('--image-column', default=None,
                   help='column with the image bytes, a {bytes, path} struct or a path (not given: the first of '
                        f'{", ".join(PARQUET_IMAGE_COLUMNS)})')
    p.add_argument('--caption-column', default=None,
                   help=f'column with the caption (not given: the first of {", ".join(PARQUET_CAPTION_COLUMNS)})')
    p.add_argument('--label-column', default=None,
                   help="integer class column, written as 'label' (zero-shot evaluation needs it)")
    p.add_argument('--images', default=None,
                   help='folder or s3:// prefix of relative image paths (not given: the parquet file\'s folder)')
    p = add('shapes', [common], 'procedural shapes demo set')
    p.add_argument('--num-samples', type=int, default=10_000, help='number of samples')
    p.add_argument('--noise', type=float, default=0.0, help='fraction of mismatched captions')
    p.add_argument('--seed', type=int, default=0, help='seed of the per-example draws')
    p.add_argument('--image-size', type=int, default=32, help='image side in pixels')
    p = add('fashion-mnist', [common], 'Fashion-MNIST captions demo set')
    p.add_argument('--split', default='train', choices=('train', 'test'), help='Fashion-MNIST split')
    p.add_argument('--num-samples', type=int, default=None, help='first N images (not given: all)')
    p.add_argument('--mismatched', type=float, default=0.0, help='fraction of captions naming another class')
    p.add_argument('--junk', type=float, default=0.0, help='fraction of junk alt-text captions')
    p.add_argument('--near-duplicates', type=float, default=0.0, help='fraction of near-duplicate images')
    p.add_argument('--curated', type=int, default=None, metavar='N',
                   help='write the clean class-balanced curated subset of N samples instead')
    p.add_argument('--seed', type=int, default=0, help='seed of the per-example draws')
    p.add_argument('--root', default=None,
                   help='folder with the IDX files (not given: those of dataset-fashion-mnist)')
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``composer-jest convert {folder,webdataset,parquet,shapes,fashion-mnist} --out OUT ...``; returns the exit
    code."""
    args = _parser().parse_args(argv)
    options = MDSOptions(
        compression=None if args.compression.lower() in ('', 'none') else args.compression,
        hashes=sorted(h for h in args.hashes.split(',') if h), size_limit=args.size_limit,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    check = None
    if args.source in ('folder', 'webdataset', 'parquet'):
        check = CaptionCheck(context=args.caption_context or None, reject_long=args.reject_long_captions)
    try:
        if args.source == 'folder':
            summary = convert_folder(args.captions, args.out, images_dir=args.images, image_column=args.image_column,
                                     caption_column=args.caption_column, label_column=args.label_column,
                                     keep_columns=args.keep_columns, image_encoding=args.image_encoding,
                                     encoding=args.encoding, scoring_side=args.scoring_side,
                                     skip_bad=args.skip_bad, options=options, captions_check=check)
        elif args.source == 'webdataset':
            summary = convert_webdataset(args.shards, args.out, image_encoding=args.image_encoding,
                                         keep_columns=args.keep_columns, skip_bad=args.skip_bad, options=options,
                                         captions_check=check, scoring_side=args.scoring_side)
        elif args.source == 'parquet':
            summary = convert_parquet(args.files, args.out, image_column=args.image_column,
                                      caption_column=args.caption_column, label_column=args.label_column,
                                      keep_columns=args.keep_columns, images_dir=args.images,
                                      image_encoding=args.image_encoding, skip_bad=args.skip_bad, options=options,
                                      captions_check=check, scoring_side=args.scoring_side)
        elif args.source == 'shapes':
            summary = convert_shapes(args.out, num_samples=args.num_samples, noise=args.noise, seed=args.seed,
                                     image_size=args.image_size, options=options)
        else:
            from composer_jest.data.demo.fashion_mnist import WebNoise

            noisy = args.mismatched or args.junk or args.near_duplicates
            noise = WebNoise(mismatched=args.mismatched, junk=args.junk, near_duplicate=args.near_duplicates)
            summary = convert_fashion_mnist(args.out, split=args.split, num_samples=args.num_samples,
                                            noise=noise if noisy else None, curated=args.curated, seed=args.seed,
                                            root=args.root, options=options)
    except (ConversionError, RemoteAccessError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'composer-jest convert: error: {e}', file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == '__main__':
    sys.exit(main())
