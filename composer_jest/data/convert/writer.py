"""The one MDS writer every conversion (and ``composer-jest filter``) goes through: atomic publish, local or ``s3://``.

A dataset is written to a staging place and replaces the one at ``out`` only after it is complete. Locally the
staging directory (a sibling of ``out``) is renamed into place; on ``s3://`` the shards go under a fresh
``out/<generation>/`` prefix, ``out/index.json`` (pointing at them) is written last, in one PUT, and the previous
dataset's objects are deleted only after it. A failed ``overwrite`` therefore leaves the previous dataset readable,
and a failed write never leaves a readable ``index.json`` describing a partial one. Other object stores
(``gs://``…) are written in place (not atomic).

Two entry points share that path:

- :func:`write_rows` writes rows as they are (a filtered copy of a dataset, any columns);
- :func:`write_mds` is the conversion writer: it checks every sample (image, non-empty caption, caption length),
  skips and counts bad ones with ``skip_bad``, and numbers the written samples ``index = 0..n-1``.

Both write a ``convert_summary.json`` (:class:`ConvertSummary`) next to the shards and return the summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from composer_jest.data.remote import (
    RemoteAccessError,
    check_s3_prefix,
    delete_s3_object,
    is_remote,
    list_s3_objects,
    remote_errors,
    s3_client,
    split_s3_url,
)

__all__ = ['DEFAULT_HASHES', 'SUMMARY_FILE', 'EMPTY_CAPTION', 'ConversionError', 'BadSampleError', 'MDSOptions',
           'ConvertSummary', 'CaptionCheck', 'Record', 'write_mds', 'write_rows']

DEFAULT_HASHES = ('sha1', 'xxh64')
SUMMARY_FILE = 'convert_summary.json'
EMPTY_CAPTION = 'empty caption'  # the reason of a bad sample counted in ConvertSummary.empty_captions
_MAX_LISTED_SKIPS = 20
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

    def record(self, extra: Optional[Mapping[str, Any]] = None) -> dict:
        """The ``convert_summary.json`` content: the fields but ``seconds``, then ``extra``."""
        return {**{k: v for k, v in asdict(self).items() if k != 'seconds'}, **(extra or {})}


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


# -- the two entry points ----------------------------------------------------------------------------------
def write_rows(
    rows: Iterable[dict],
    out: str,
    columns: dict[str, str],
    *,
    options: Optional[MDSOptions] = None,
    total: Optional[int] = None,
    number: Optional[str] = None,
    summary_extra: Optional[Mapping[str, Any]] = None,
    label: str = 'write',
) -> ConvertSummary:
    """Write ``rows`` as an MDS dataset at ``out`` (a directory or ``s3://bucket/prefix``), atomically.

    Each row is a dict ``{column: value}`` over exactly the names of ``columns`` (``{column: MDS encoding}``, e.g.
    ``{'image': 'bytes', 'caption': 'str', 'index': 'int', 'meta': 'json'}``; the encodings of an existing dataset
    are in its ``index.json``, ``shards[0]['column_names']``/``['column_encodings']``). Values are written as
    given: no sample checks, no skipping.

    ``out`` follows :func:`write_mds`: it must be absent or empty, or hold a dataset and ``options.overwrite`` be
    set; the new dataset replaces the old one only once complete (see the module docstring), so a failure —
    raised unchanged, object-store failures as one :class:`~composer_jest.data.remote.RemoteAccessError` — leaves
    ``out`` as it was. Zero rows is a :class:`ConversionError` (an empty dataset cannot be read).

    Args:
        rows: the rows, in the order they are written (an iterator is consumed once).
        out: output directory or object-store URL.
        columns: MDS column encodings of the rows.
        options: :class:`MDSOptions` (compression, hashes, shard size, ``overwrite``, progress bar).
        total: number of rows, for the progress bar.
        number: a column (e.g. ``'index'``) set to each written row's position ``0..n-1`` (added to ``columns`` as
            ``'int'``, replacing any value the row has); ``None``: rows are written as they are.
        summary_extra: more fields for ``convert_summary.json``, read after the last row (so the code producing
            ``rows`` may fill it in while they are consumed: e.g. ``{'kept': ..., 'dropped': ...}``).
        label: progress-bar label (``'<label> -> out'``).

    Returns:
        The :class:`ConvertSummary` (``written`` rows, ``columns`` as written), also in ``convert_summary.json``.
    """
    columns = {**columns, number: 'int'} if number else dict(columns)
    summary = ConvertSummary(out=str(out), written=0, columns=columns)
    return _write(rows, summary, options or MDSOptions(), total=total, number=number, extra=summary_extra,
                  label=label)


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
    captions = captions or CaptionCheck()
    columns = {**columns, 'index': 'int'}
    summary = ConvertSummary(out=str(out), written=0, columns=columns, caption_context=captions.context)
    samples = _checked_samples(records, columns, captions, summary, skip_bad)
    return _write(samples, summary, options or MDSOptions(), total=total, number='index', label='convert')


def _checked_samples(records: Iterable[Record], columns: dict[str, str], captions: CaptionCheck,
                     summary: ConvertSummary, skip_bad: bool) -> Iterator[Optional[dict]]:
    """The checked sample of each record, or ``None`` for a bad one skipped (counted in ``summary``)."""
    for key, load in records:
        try:
            yield _check_sample(key, load(), columns, captions, summary)
        except BadSampleError as e:
            summary.empty_captions += e.reason.startswith(EMPTY_CAPTION)
            if not skip_bad:
                raise
            summary.skipped += 1
            if len(summary.skipped_examples) < _MAX_LISTED_SKIPS:
                summary.skipped_examples.append(f'{e.key}: {e.reason}')
            yield None


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


# -- the shared path: stage, write, publish (or abort) -------------------------------------------------------
def _write(rows: Iterable[Optional[dict]], summary: ConvertSummary, options: MDSOptions, *, total: Optional[int],
           number: Optional[str], label: str, extra: Optional[Mapping[str, Any]] = None) -> ConvertSummary:
    """Write ``rows`` (``None``: a skipped record, only counted by the progress bar) to a staging place and publish
    it at ``summary.out``; on any failure drop the staged files and re-raise (object-store failures translated)."""
    from streaming import MDSWriter

    out, start = summary.out, time.perf_counter()
    _check_output(out, options.overwrite)
    staging = _staging(out)
    writer = MDSWriter(out=staging, columns=summary.columns, compression=options.compression,
                       hashes=sorted(options.hashes), size_limit=options.size_limit,
                       exist_ok=staging == out and options.overwrite, progress_bar=False)
    try:
        with remote_errors(out, 'write', keep=(ConversionError,)) if is_remote(out) else nullcontext():
            _write_all(writer, rows, summary, options, total, number, label)
            summary.seconds = time.perf_counter() - start
            record = summary.record(extra)
            if not out.startswith('s3://'):
                _write_summary(writer, record)
            writer.finish()
            _publish(out, staging, record)
    except BaseException as e:
        _abort(writer, out, staging)
        if is_remote(out) and not isinstance(e, (ConversionError, RemoteAccessError)) and 'threads failed' in str(e):
            # streaming's upload threads report only this
            raise RemoteAccessError(f'uploading shards to {out} failed (see the upload traceback above)') from e
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _write_all(writer: Any, rows: Iterable[Optional[dict]], summary: ConvertSummary, options: MDSOptions,
               total: Optional[int], number: Optional[str], label: str) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc=f'{label} -> {summary.out}', unit=' samples', disable=not options.progress,
              file=sys.stderr) as bar:
        for row in rows:
            bar.update(1)
            if row is None:
                continue
            if number:
                row[number] = summary.written
            writer.write(row)
            summary.written += 1
    if summary.written == 0:
        raise ConversionError(f'no samples written to {summary.out} ({summary.skipped} skipped as bad)')


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


def _publish(out: str, staging: str, record: dict) -> None:
    """Make the complete dataset at ``staging`` the one at ``out`` (the commit point of a write)."""
    if staging == out:
        return
    if out.startswith('s3://'):
        _publish_s3(out, staging, record)
        return
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


def _publish_s3(out: str, staging: str, record: dict) -> None:
    """Point ``out/index.json`` at the shards under ``staging`` (one PUT, the commit), then delete the old ones."""
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
    client.put_object(Bucket=bucket, Key=key(SUMMARY_FILE), Body=json.dumps(record, indent=1).encode())
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


def _write_summary(writer: Any, record: dict) -> None:
    """Record the counts next to the shards, so a short dataset is visibly short."""
    with open(os.path.join(writer.local, SUMMARY_FILE), 'w') as f:
        json.dump(record, f, indent=1)
    if writer.remote:
        writer.cloud_writer.upload_file(SUMMARY_FILE)


def _abort(writer: Any, out: str, staging: str) -> None:
    """Drop a failed write's staged files; ``out`` is untouched (unless written in place)."""
    writer.cancel_future_jobs()
    if writer.remote or staging != out:
        shutil.rmtree(writer.local, ignore_errors=True)
    if staging.startswith('s3://') and staging != out:
        try:
            for url in list_s3_objects(staging.rstrip('/') + '/'):
                delete_s3_object(url)
        except Exception:  # the store may be what failed: the staged objects are unreferenced, only wasted space
            warnings.warn(f'could not delete the partial conversion at {staging}', UserWarning, stacklevel=2)
