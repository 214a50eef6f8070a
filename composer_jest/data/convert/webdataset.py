"""Source (b): webdataset tar shards (img2dataset/DataComp layout: ``key.jpg`` + ``key.txt`` [+ ``key.json``]),
local or ``s3://``."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

from composer_jest.data.convert.images import check_encoding, check_scoring_side, decode_image, encode_image
from composer_jest.data.convert.rows import numeric_field, parse_keep_columns
from composer_jest.data.convert.writer import (
    BadSampleError,
    CaptionCheck,
    ConversionError,
    ConvertSummary,
    MDSOptions,
    Record,
    write_mds,
)
from composer_jest.data.remote import list_s3_objects, open_s3_object
from composer_jest.data.two_stage import SCORING_COLUMN, scoring_thumbnail

__all__ = ['IMAGE_EXTENSIONS', 'CAPTION_EXTENSIONS', 'TAR_SUFFIXES', 'expand_shards', 'convert_webdataset']

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')
CAPTION_EXTENSIONS = ('txt', 'caption')
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
    image_column_encoding = check_encoding(image_encoding)
    check_scoring_side(scoring_side)
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
        numbers = {col: numeric_field(f'{name}.json', meta, col, enc) for col, enc in kept.items()}
        meta = {k: v for k, v in meta.items() if k not in kept}
        meta.update(key=key, shard=shard)
        image = decode_image(name, data=group[image_ext])
        scoring = {SCORING_COLUMN: scoring_thumbnail(image, scoring_side)} if scoring_side is not None else {}
        return {'image': encode_image(image, group[image_ext], image_encoding), 'caption': caption, 'meta': meta,
                **numbers, **scoring}
    return load


