"""Read MDS image–caption shards with mosaicml-streaming, as JEST super-batches.

:class:`ImageTextStreamingDataset` is a :class:`streaming.StreamingDataset` (remote ``s3://`` reads with a
local cache, deterministic shuffling, ``cache_limit`` eviction, mid-epoch resumption: all streaming's)
that turns each MDS sample into ``{image, text, index, ...}`` tensors with the open_clip model's
preprocessing and tokenizer. :func:`build_streaming_dataloader` sizes the per-rank super-batch
``N = b / (1 - f)`` from the train batch ``b`` and the JEST filter ratio ``f`` and returns a
:class:`streaming.StreamingDataLoader`, whose ``state_dict`` Composer checkpoints.

Two things streaming leaves vague are made loud here: object-store failures (unreachable endpoint,
wrong credentials, missing bucket) surface as one :class:`~composer_jest.data.remote.RemoteAccessError`
naming the remote and ``S3_ENDPOINT_URL``; a corrupted shard raises :class:`ShardError` naming the shard
(streaming's background download thread would otherwise end the epoch early, silently).

streaming checks a shard's hash only when it downloads it; a shard already on disk (a local dataset, or
the cache of a remote one) is trusted as it is. :class:`VerifiedStream` checks the size and the
recorded hash of every shard file it finds on disk when the dataset is opened, before any sample is
read: a damaged cached file is deleted and fetched again from the remote (and checked on download); a
damaged file of a local-only dataset raises one :class:`ShardError` naming the shard. A cached
``index.json`` that does not parse is fetched again from the remote. The cost is one read and hash of
the files on disk per dataset construction (``benchmarks/streaming_throughput.py`` measures it;
``verify_local=False`` skips it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.hashing import get_hash

from composer_jest.core.batch import ENCODED_IMAGE_KEY, IMAGE_KEY, INDEX_KEY, TEXT_KEY
from composer_jest.data.remote import RemoteAccessError, describe_remote_error, download_s3_file, is_remote
from composer_jest.data.two_stage import SCORING_COLUMN, open_rgb

__all__ = ['ImageTextStreamingDataset', 'ShardError', 'VerifiedStream', 'build_streaming_dataloader']

_INDEX = 'index.json'
DOWNLOAD_RETRY = 6  # attempts per file: with 1, 2, 4, 8, 16 s of backoff, an outage of ~30 s is ridden out
DOWNLOAD_TIMEOUT = 30.0  # seconds per connect and per read of one attempt


class ShardError(RuntimeError):
    """A shard could not be downloaded, verified or decoded; the message names the shard file."""


class _OneShardError(logging.Filter):
    """streaming re-raises a download thread's error in a future's callback, which ``concurrent.futures``
    logs with a traceback per failed thread; the same :class:`ShardError` is raised once in the reading
    thread, so these copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ShardError))


logging.getLogger('concurrent.futures').addFilter(_OneShardError())


class VerifiedStream(Stream):
    """A :class:`streaming.Stream` that checks the shard files it finds on disk before trusting them.

    streaming validates a hash only on download. Here every shard file already present in ``local``
    (the cache, or a local-only dataset) is checked when the dataset is set up: its size, then its
    recorded hash (``validate_hash`` if set, else ``xxh64`` if recorded, else any recorded one). A bad file
    is deleted when there is a remote (streaming then downloads and verifies it again when needed);
    without a remote it raises :class:`ShardError` naming the shard. A cached ``index.json`` that does not
    parse is deleted and downloaded again.

    Files of an ``s3://`` remote are downloaded by :func:`~composer_jest.data.remote.download_s3_file`:
    ``download_retry`` attempts in all, each bounded by ``download_timeout`` seconds per connect and per
    read, with exponential backoff and a warning naming what it waits for (streaming's own S3 client
    multiplies its read timeout by botocore's internal retries, so a frozen endpoint stalls for minutes
    without a word). ``index.json``, fetched when the dataset is opened, gets at most 2 attempts: a failure
    there is most likely a wrong endpoint or bucket, and is reported at once.
    """

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        if not str(self.remote or '').startswith('s3://'):
            return super()._download_file(from_basename, to_basename)
        remote = '/'.join([self.remote.rstrip('/')] + [p.strip('/') for p in (self.split, from_basename) if p])
        local = os.path.join(self.local, self.split or '', to_basename or from_basename)
        # The index is fetched when the dataset is opened: a failure there is most likely a wrong endpoint or
        # bucket, reported after one retry; shards, fetched mid-run, ride out an outage.
        attempts = min(2, self.download_retry) if from_basename == _INDEX else self.download_retry
        download_s3_file(remote, local, attempts=max(1, attempts), timeout=self.download_timeout)
        return local

    def get_shards(self, world: Any, allow_unsafe_types: bool) -> list:
        filename = os.path.join(self.local, self.split or '', _INDEX)
        if world.is_local_leader and os.path.isfile(filename):
            try:
                with open(filename) as f:
                    json.load(f)
            except ValueError as e:
                if not self.remote:
                    raise ShardError(f'{filename} is corrupted (not valid JSON: {e}); re-convert the dataset') from None
                os.remove(filename)  # a stale or damaged cached copy: streaming fetches the remote's again
        return super().get_shards(world, allow_unsafe_types)

    def set_up_local(self, shards: list, cache_usage_per_shard: Any) -> None:
        for shard in shards:
            for raw, zipped in shard.file_pairs:
                for info in (raw, zipped):
                    path = os.path.join(self.local, self.split or '', info.basename) if info else None
                    if path is None or not os.path.isfile(path):
                        continue
                    problem = self._problem(path, info)
                    if problem is None:
                        continue
                    if not self.remote or self.remote == self.local:
                        raise ShardError(f'shard {info.basename} of {self.local} is corrupted: {problem}; '
                                         're-convert the dataset')
                    os.remove(path)  # fetched again (and verified) from the remote when it is needed
        super().set_up_local(shards, cache_usage_per_shard)

    def _problem(self, path: str, info: Any) -> Optional[str]:
        """Why the file at ``path`` does not match its index entry, or ``None`` if it does."""
        size = os.path.getsize(path)
        if size != info.bytes:
            return f'{size} bytes on disk, {info.bytes} in index.json (truncated?)'
        hashes = info.hashes or {}
        algo = self.validate_hash if self.validate_hash in hashes else (
            'xxh64' if 'xxh64' in hashes else next(iter(sorted(hashes)), None))
        if algo is None:
            return None
        with open(path, 'rb') as f:
            digest = get_hash(algo, f.read())
        return None if digest == hashes[algo] else f'its {algo} hash does not match index.json'


class ImageTextStreamingDataset(StreamingDataset):
    """A :class:`~streaming.StreamingDataset` of image–caption MDS shards yielding model-ready samples.

    Each sample becomes ``{'image': FloatTensor[3, s, s], 'text': LongTensor[context], 'index': LongTensor[]}``
    plus the passed-through extra columns: numbers and ndarrays as tensors (so precomputed float16
    ``ref_image_features`` stack under default collate), strings as they are.

    Args:
        remote: ``s3://bucket/prefix`` (or any streaming remote) of the shards; ``None`` for local shards.
        local: local cache directory (or the shards' directory when ``remote`` is ``None``). One per dataset.
        tokenizer: open_clip tokenizer (list of str -> ``LongTensor[n, context]``), e.g. ``CLIPModel.tokenizer``.
        transform: PIL image -> tensor; default ``open_clip.image_transform(image_size, is_train=False)``.
        image_size: side of the default transform's output.
        image_key, caption_key: MDS column names of the image and the caption.
        extra_columns: columns to pass through besides ``index``; ``None``: every numeric/ndarray column
            (``label``, ``clean``, ``convert --keep-columns`` ones, cached reference features…); json columns only
            when named here. ``batch_keys`` lists the keys each sample then has, ``column_encodings`` the shards'
            columns.
        keep_caption: also yield the caption string as ``caption``.
        validate_hash: hash checked on every downloaded shard; ``'auto'`` picks ``xxh64`` (or the first hash
            the index records), ``None`` disables the check.
        verify_local: check the size and hash of the shard files already on disk when the dataset is opened
            (:class:`VerifiedStream`): a damaged cached file is fetched again, a damaged local-only one is an
            error. Ignored when ``streams`` are passed.
        two_stage_size: two-stage decoding (:mod:`composer_jest.data.two_stage`): JPEGs are decoded in draft mode
            (DCT scaling) to at least this side before ``transform`` (which should then output the scoring
            resolution), and each sample also carries its encoded image bytes as ``image_bytes``, decoded in full
            only if selected. Needs the image column stored as ``bytes`` (``convert``'s default). Shards with an
            ``image_scoring`` column (``convert --scoring-side``) are decoded from that thumbnail instead.
        **kwargs: :class:`~streaming.StreamingDataset` arguments (``shuffle``, ``shuffle_seed``, ``batch_size``,
            ``cache_limit``, ``predownload``, ``epoch_size``…). ``download_retry`` (attempts per file, default
            6) and ``download_timeout`` (seconds per connect / read of an attempt, default 30) bound how long a
            failing object store is waited for (see :class:`VerifiedStream`).
    """

    def __init__(
        self,
        *,
        remote: Optional[str] = None,
        local: Optional[str] = None,
        tokenizer: Optional[Callable] = None,
        transform: Optional[Callable] = None,
        image_size: int = 32,
        image_key: str = 'image',  # the shard column (the batch key is always IMAGE_KEY)
        caption_key: str = 'caption',
        extra_columns: Optional[Sequence[str]] = None,
        keep_caption: bool = False,
        validate_hash: Optional[str] = 'auto',
        verify_local: bool = True,
        two_stage_size: Optional[int] = None,
        **kwargs: Any,
    ):
        if two_stage_size is not None and (isinstance(two_stage_size, bool) or not isinstance(two_stage_size, int)
                                           or two_stage_size < 1):
            raise ValueError(f'two_stage_size must be a positive int (the scoring image side) or None, '
                             f'got {two_stage_size!r}')
        self.two_stage_size = two_stage_size
        if tokenizer is None:
            raise ValueError('tokenizer is required (e.g. CLIPModel(...).tokenizer or open_clip.get_tokenizer(name))')
        if transform is None:
            import open_clip

            transform = open_clip.image_transform(image_size, is_train=False)
        self.tokenizer, self.transform = tokenizer, transform
        self.image_key, self.caption_key, self.keep_caption = image_key, caption_key, keep_caption
        self.remote_name = remote or local
        self._shard_failure: Optional[ShardError] = None
        try:
            kwargs.setdefault('download_retry', DOWNLOAD_RETRY)
            kwargs.setdefault('download_timeout', DOWNLOAD_TIMEOUT)
            location = {'remote': remote, 'local': local}
            if verify_local and 'streams' not in kwargs:
                location = {'streams': [VerifiedStream(remote=remote, local=local)]}
            super().__init__(**location, validate_hash=None if validate_hash == 'auto' else validate_hash, **kwargs)
        except Exception as e:
            err = describe_remote_error(e, str(remote), 'read') if is_remote(remote) else None
            if err is not None:
                raise err from None
            raise
        if validate_hash == 'auto':
            self._pick_hash()
        self._check_columns(extra_columns)

    def _pick_hash(self) -> None:
        """Validate with a hash every shard records: ``xxh64`` if written (fast), else the first one."""
        recorded = None
        for shard in self.shards:
            for raw, zipped in shard.file_pairs:
                hashes = set((zipped or raw).hashes)
                recorded = hashes if recorded is None else recorded & hashes
        choice = 'xxh64' if recorded and 'xxh64' in recorded else (sorted(recorded)[0] if recorded else None)
        for stream in self.streams:
            stream.validate_hash = choice

    def _check_columns(self, extra_columns: Optional[Sequence[str]]) -> None:
        shard = self.shards[0]
        encodings = dict(zip(shard.column_names, shard.column_encodings))
        for name in (self.image_key, self.caption_key, 'index'):
            if name not in encodings:
                raise ValueError(f'{self.remote_name}: the shards have no {name!r} column (columns: '
                                 f'{sorted(encodings)}); write them with `composer-jest convert`')
        skip = {self.image_key, self.caption_key, 'index'}
        if extra_columns is None:  # numbers and arrays collate into tensors; json/str/bytes are left out
            self.extra_columns = [c for c, enc in encodings.items() if c not in skip and _is_numeric(enc)]
        else:
            missing = [c for c in extra_columns if c not in encodings]
            if missing:
                raise ValueError(f'extra_columns {missing} are not in the shards (columns: {sorted(encodings)})')
            self.extra_columns = [c for c in extra_columns if c not in skip]
        self.column_encodings = encodings  # the shards' MDS columns and their encodings
        if self.two_stage_size is not None and encodings[self.image_key] != 'bytes':
            raise ValueError(f'{self.remote_name}: two-stage decoding needs the {self.image_key!r} column stored as '
                             f"the encoded file ('bytes'), got {encodings[self.image_key]!r}; convert with "
                             '`composer-jest convert --image-encoding source` (the default) or bytes')
        self._thumbnails = encodings.get(SCORING_COLUMN) == 'bytes'
        caption = ('caption',) if self.keep_caption else ()
        encoded = (ENCODED_IMAGE_KEY,) if self.two_stage_size is not None else ()
        self.batch_keys = (IMAGE_KEY, TEXT_KEY, INDEX_KEY, *self.extra_columns, *caption, *encoded)

    # -- resumption ---------------------------------------------------------------------------------
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """streaming's resumption state, with the epoch boundary fixed: after a finished epoch ``e`` it names
        epoch ``e + 1`` at sample 0 (streaming names epoch ``e`` at sample 0, which replays epoch ``e``).

        Upstream cause: Composer's ``State._dataset_state_dict`` calls ``dataset.state_dict(sample_in_epoch,
        from_beginning=True)``; at ``Event.EPOCH_CHECKPOINT`` its timestamp has moved to epoch ``e + 1`` and
        ``sample_in_epoch`` is 0, while streaming's ``StreamingDataset.state_dict`` records ``epoch =
        next_epoch - 1`` (the epoch it last iterated, ``e``) with ``sample_in_epoch = 0``: a run resumed from an
        ``ep{e+1}-ba…`` checkpoint streams epoch ``e``'s order again and stays an epoch behind Composer.
        Mid-epoch checkpoints (``num_samples > 0``) are left as streaming writes them.

        An epoch is over exactly when Composer counts 0 samples in it and streaming has started iterating it
        (``next_epoch > epoch``: streaming bumps ``next_epoch`` when an epoch's iteration begins; before that,
        e.g. a checkpoint right after a resume, the recorded epoch is still the one to stream).
        """
        state = super().state_dict(num_samples, from_beginning)
        if from_beginning and num_samples == 0 and self.next_epoch > state['epoch'] >= 0:
            state['epoch'] += 1
        return state

    # -- samples ------------------------------------------------------------------------------------
    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        """Sample ``sample_id`` decoded and preprocessed (``dataset[i]`` calls this)."""
        raw = super().get_item(sample_id, retry)
        try:
            return self.decode_sample(raw)
        except Exception as e:
            raise ShardError(f'{self._shard_name(sample_id)}: cannot decode sample {sample_id} '
                             f'({type(e).__name__}: {e})') from e

    def decode_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One raw MDS sample -> ``{image, text, index, *extra}`` tensors."""
        image = encoded = sample[self.image_key]
        if self.two_stage_size is not None and self._thumbnails:  # stage 1 from the stored scoring thumbnail
            image = self._thumbnail(sample[SCORING_COLUMN])
        elif isinstance(image, (bytes, bytearray, memoryview)):  # 'bytes' column: the original file
            image = open_rgb(bytes(image), draft=self.two_stage_size)  # draft: stage 1 of two-stage decoding
        elif image.mode != 'RGB':
            image = image.convert('RGB')
        caption = sample[self.caption_key]
        out = {
            IMAGE_KEY: self.transform(image),
            TEXT_KEY: self.tokenizer([caption])[0],
            INDEX_KEY: torch.tensor(int(sample['index']), dtype=torch.long),
        }
        for name in self.extra_columns:
            out[name] = _to_tensor(sample[name])
        if self.keep_caption:
            out['caption'] = caption
        if self.two_stage_size is not None:
            out[ENCODED_IMAGE_KEY] = bytes(encoded)  # decoded in full after selection (FullResDecoder)
        return out

    def _thumbnail(self, data: bytes) -> Any:
        image = open_rgb(bytes(data))
        if min(image.size) < self.two_stage_size:
            raise ValueError(f'the {SCORING_COLUMN!r} thumbnail is {image.size[0]}x{image.size[1]}, smaller than the '
                             f'scoring side {self.two_stage_size}: re-convert with --scoring-side '
                             f'{self.two_stage_size} or more')
        return image

    # -- loud shard failures ------------------------------------------------------------------------
    def _shard_name(self, sample_id: int) -> str:
        shard_id, _ = self.spanner[sample_id]
        return self._shard_label(shard_id)

    def _shard_label(self, shard_id: int) -> str:
        raw, zipped = self.shards[shard_id].file_pairs[0]
        basename = (zipped or raw).basename
        stream = self.streams[self.stream_per_shard[shard_id]]
        where = stream.remote or stream.local
        return f'shard {basename} of {where}'

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download/verify/decompress, with failures turned into a :class:`ShardError`."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            where = self._shard_label(shard_id)
            remote_err = e if isinstance(e, RemoteAccessError) else describe_remote_error(e, where, 'download')
            if isinstance(remote_err, RemoteAccessError):
                failure = ShardError(str(remote_err))
            elif 'Checksum failure' in str(e):
                algo = self.streams[self.stream_per_shard[shard_id]].validate_hash
                failure = ShardError(f'{where} is corrupted: its {algo} hash does not match '
                                     f'index.json ({e}); re-convert or re-upload it')
            else:
                failure = ShardError(f'{where}: cannot prepare shard ({type(e).__name__}: {e})')
            self._shard_failure = failure
            raise failure from e

    def _each_sample_id(self, it: Any) -> Any:
        # streaming's yield loop stops quietly when its download thread died; raise that thread's error instead
        # of ending the epoch early.
        yield from super()._each_sample_id(it)
        if self._shard_failure is not None:
            raise self._shard_failure
        if hasattr(self, '_event') and self._event.is_set() and it.yield_index < it.total:
            raise ShardError(f'{self.remote_name}: a background shard download failed (see the traceback above)')


def _is_numeric(encoding: str) -> bool:
    return encoding.startswith('ndarray') or encoding in (
        'int', 'float64', 'float32', 'float16', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32',
        'uint64', 'str_int', 'str_float',
    )


def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))  # a writable copy: MDS arrays are read-only views
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return torch.as_tensor(value)
    return value


def build_streaming_dataloader(
    remote: Optional[str],
    local: str,
    tokenizer: Callable,
    *,
    batch_size: int,
    image_size: int = 32,
    transform: Optional[Callable] = None,
    shuffle: bool = True,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    prefetch_factor: Optional[int] = None,
    persistent_workers: Optional[bool] = None,
    pin_memory: bool = False,
    drop_last: bool = True,
    cache_limit: Optional[Union[int, str]] = None,
    predownload: Optional[int] = None,
    **dataset_kwargs: Any,
) -> StreamingDataLoader:
    """A :class:`~streaming.StreamingDataLoader` of JEST super-batches from MDS shards.

    Args:
        remote: ``s3://bucket/prefix`` of the shards, or ``None`` to read ``local`` directly.
        local: local cache directory (unique per dataset), or the shards' directory.
        tokenizer: the model's tokenizer (``CLIPModel.tokenizer``).
        batch_size: what each rank's loader yields per step: for JEST, the super-batch
            ``N = superbatch_size(b, f)`` (:func:`composer_jest.core.batch.superbatch_size`); without JEST, ``b``.
        image_size: side of the default open_clip eval transform.
        transform: custom PIL -> tensor transform instead.
        shuffle, shuffle_seed: streaming's deterministic shuffle (resumable mid-epoch).
        num_workers, prefetch_factor, persistent_workers, pin_memory: DataLoader knobs
            (``persistent_workers`` defaults to ``num_workers > 0``).
        drop_last: drop a last partial super-batch (training: keep ``True``).
        cache_limit: evict cold shards beyond this many bytes (``'10gb'`` style), ``None``: keep all.
        predownload: samples to download ahead per worker (streaming's default: ``8 * N``).
        **dataset_kwargs: more :class:`ImageTextStreamingDataset` / ``StreamingDataset`` arguments.

    Example:
        >>> from composer_jest.core.batch import superbatch_size
        >>> superbatch_size(64, filter_ratio=0.8)  # what each rank's loader yields to train on b = 64
        320
        >>> # loader = build_streaming_dataloader('s3://bucket/shapes', '/tmp/cache', model.tokenizer,
        >>> #                                     batch_size=superbatch_size(64, 0.8))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive int (the per-rank super-batch N), got {batch_size!r}')
    if 'filter_ratio' in dataset_kwargs:
        raise TypeError('build_streaming_dataloader takes the super-batch itself: '
                        'batch_size=composer_jest.core.batch.superbatch_size(b, filter_ratio), not filter_ratio=')
    n = batch_size
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f'num_workers must be an int >= 0, got {num_workers!r}')
    dataset = ImageTextStreamingDataset(
        remote=remote, local=local, tokenizer=tokenizer, transform=transform, image_size=image_size,
        batch_size=n, shuffle=shuffle, shuffle_seed=shuffle_seed, cache_limit=cache_limit, predownload=predownload,
        **dataset_kwargs,
    )
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return StreamingDataLoader(
        dataset, batch_size=n, drop_last=drop_last, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
    )
