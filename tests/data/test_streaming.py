"""Reading MDS shards with streaming: super-batch sizing, S3 via a real moto endpoint, JEST training,
mid-epoch resumption, and loud failures (unreachable endpoint, wrong credentials, corrupted shard)."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import Callback
from s3_server import moto_server, s3_endpoint, streaming_shm, unreachable_url  # noqa: F401  (pytest fixtures)

from composer_jest import JEST, CLIPModel
from composer_jest.core.batch import superbatch_size
from composer_jest.data.convert import MDSOptions, convert_shapes, write_mds
from composer_jest.data.demo.shapes import ShapesDataset
from composer_jest.data.remote import RemoteAccessError
from composer_jest.data.streaming import (
    ImageTextStreamingDataset,
    ShardError,
    build_streaming_dataloader,
)

QUIET = MDSOptions(size_limit=20_000, progress=False)  # ~6 shapes per shard: many shards, so shuffling spans shards
NUM_SAMPLES = 96


@pytest.fixture(scope='module')
def model() -> CLIPModel:
    return CLIPModel('jest-tiny')


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory, streaming_shm) -> str:  # noqa: F811
    out = str(tmp_path_factory.mktemp('mds') / 'shapes')
    convert_shapes(out, num_samples=NUM_SAMPLES, noise=0.25, seed=3, options=QUIET)
    return out


def _cache(tmp_path) -> str:
    """A fresh local cache directory: streaming refuses two live datasets on one ``local``."""
    return str(tmp_path / f'cache-{uuid.uuid4().hex[:8]}')


class RecordBatches(Callback):
    """Records the ``index`` column of every batch the model trains on (after any selection)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def after_dataloader(self, state, logger) -> None:
        self.batches.append(state.batch['index'].tolist())


def _trainer(model, loader, max_duration, callbacks=(), algorithms=(), **kwargs) -> Trainer:
    return Trainer(
        model=model, train_dataloader=loader, max_duration=max_duration, device='cpu', seed=0,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), callbacks=list(callbacks),
        algorithms=list(algorithms), progress_bar=False, log_to_console=False, loggers=[], **kwargs,
    )


# -- sizing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(('b', 'f', 'n'), [(4, 0.5, 8), (64, 0.8, 320), (10, 0.0, 10), (3, 0.9, 30), (32, 0.75, 128)])
def test_superbatch_size(b, f, n):
    assert superbatch_size(b, f) == n


def test_superbatch_size_rejects_non_integer():
    with pytest.raises(ValueError, match=r'batch_size=5 with filter_ratio=0.3.*multiple of 7.*filter_ratio=0.375'):
        superbatch_size(5, 0.3)
    with pytest.raises(ValueError, match='filter_ratio must be'):
        superbatch_size(4, 1.0)
    with pytest.raises(ValueError, match='batch_size must be'):
        superbatch_size(0, 0.5)


# -- local reading -------------------------------------------------------------------------------------
def test_local_loader_yields_superbatches(shapes_dir, model, tmp_path):
    loader = build_streaming_dataloader(None, shapes_dir, model.tokenizer, batch_size=superbatch_size(4, 0.5),
                                        shuffle_seed=1)
    batches = list(loader)
    assert len(batches) == NUM_SAMPLES // 8
    first = batches[0]
    assert set(first) == {'image', 'text', 'index', 'label', 'clean'}
    assert first['image'].shape == (8, 3, 32, 32) and first['image'].dtype == torch.float32
    assert first['text'].shape == (8, model.tokenizer.context_length) and first['text'].dtype == torch.long
    seen = torch.cat([b['index'] for b in batches]).tolist()
    assert sorted(seen) == list(range(NUM_SAMPLES)), 'one epoch = every sample once (96 = 12 full super-batches)'
    assert seen != sorted(seen), "streaming's shuffle is on"
    # what the loader yields is the converted set: captions and labels of ShapesDataset(seed=3)
    ds = loader.dataset
    reference = ShapesDataset(NUM_SAMPLES, noise=0.25, seed=3)
    expected = reference.example(int(first['index'][0]))
    assert int(first['label'][0]) == expected['label'] and bool(first['clean'][0]) == expected['clean']
    assert torch.equal(first['text'][0], model.tokenizer([expected['caption']])[0])
    sample = ds[5]
    assert int(sample['index']) == 5
    del loader, ds


def test_extra_columns_pass_through_as_tensors(tmp_path, model, streaming_shm):  # noqa: F811
    """Precomputed float16 reference embeddings come through as tensors that default collate stacks."""
    out = str(tmp_path / 'cached')
    shapes = ShapesDataset(16, seed=0)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((16, 8)).astype(np.float16)

    def records():
        for i in range(16):
            ex = shapes.example(i)
            yield f'{i}', lambda ex=ex, i=i: {'image': ex['image'], 'caption': ex['caption'],
                                               'ref_image_features': feats[i], 'ref_logit_scale': np.float32(10.0)}

    write_mds(records(), out, {'image': 'png', 'caption': 'str', 'ref_image_features': 'ndarray:float16:8',
                               'ref_logit_scale': 'float32'}, options=QUIET)
    loader = build_streaming_dataloader(None, out, model.tokenizer, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch['ref_image_features'].dtype == torch.float16 and batch['ref_image_features'].shape == (4, 8)
    assert torch.equal(batch['ref_image_features'], torch.from_numpy(feats[batch['index'].numpy()]))
    assert batch['ref_logit_scale'].shape == (4,)
    del loader


def test_missing_columns_are_named(tmp_path, model, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'nocaption')
    write_mds([('a', lambda: {'image': ShapesDataset(1).example(0)['image'], 'caption': 'x'})], out,
              {'image': 'png', 'caption': 'str'}, options=QUIET)
    with pytest.raises(ValueError, match=r"caption_key|no 'text' column"):
        ImageTextStreamingDataset(local=out, tokenizer=model.tokenizer, caption_key='text')


# -- S3 -------------------------------------------------------------------------------------------------
def test_s3_round_trip_trains_jest(s3_endpoint, model, tmp_path):  # noqa: F811
    remote = f's3://{s3_endpoint.bucket}/shapes'
    summary = convert_shapes(remote, num_samples=NUM_SAMPLES, noise=0.25, seed=3, options=QUIET)
    assert summary.written == NUM_SAMPLES
    keys = [o['Key'] for o in s3_endpoint.client().list_objects_v2(Bucket=s3_endpoint.bucket)['Contents']]
    assert 'shapes/index.json' in keys and sum(k.endswith('.mds.zstd') for k in keys) > 2

    b, f = 4, 0.5
    loader = build_streaming_dataloader(remote, _cache(tmp_path), model.tokenizer, batch_size=superbatch_size(b, f),
                                        num_workers=2)
    assert loader.batch_size == 8
    jest = JEST(score='hard_learner', filter_ratio=f, n_chunks=2)
    record = RecordBatches()
    trainer = _trainer(CLIPModel('jest-tiny'), loader, '3ba', callbacks=[record], algorithms=[jest])
    trainer.fit()
    assert len(record.batches) == 3
    assert all(len(batch) == b for batch in record.batches), 'the model trains on the sub-batch b'
    flat = [i for batch in record.batches for i in batch]
    assert len(set(flat)) == len(flat) and all(0 <= i < NUM_SAMPLES for i in flat)
    assert jest.examples_seen == 3 * 8 and jest.examples_trained == 3 * b
    assert int(trainer.state.timestamp.sample) == 3 * 8, 'timestamp counts super-batch samples (for resumption)'
    trainer.close()
    del trainer, loader


def test_s3_cache_limit_evicts_shards(s3_endpoint, model, tmp_path):  # noqa: F811
    """streaming's ``cache_limit`` keeps the local cache bounded while a whole epoch still comes through."""
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=NUM_SAMPLES, seed=3, options=QUIET)
    local = _cache(tmp_path)
    probe = ImageTextStreamingDataset(remote=remote, local=_cache(tmp_path), tokenizer=model.tokenizer, batch_size=8)
    largest = max(shard.get_max_size() for shard in probe.shards)
    num_shards = len(probe.shards)
    del probe
    limit = 4 * largest + 4096
    loader = build_streaming_dataloader(remote, local, model.tokenizer, batch_size=8, cache_limit=limit)
    seen = torch.cat([batch['index'] for batch in loader]).tolist()
    assert sorted(seen) == list(range(NUM_SAMPLES))
    cached = [name for _, _, names in os.walk(local) for name in names if name.startswith('shard.')]
    assert 0 < len(cached) < num_shards and loader.dataset.cache_usage <= limit
    del loader


def _run(loader, max_duration, **kwargs) -> list[list[int]]:
    """Train a fresh model on ``loader``; the ``index`` lists of the batches it trained on."""
    record = RecordBatches()
    trainer = _trainer(CLIPModel('jest-tiny'), loader, max_duration, callbacks=[record], **kwargs)
    trainer.fit()
    trainer.close()
    return record.batches


def _first_batches(loader, n: int) -> list[list[int]]:
    """The ``index`` lists of the first ``n`` batches of a fresh pass over ``loader`` (no training)."""
    batches = []
    for batch in loader:
        batches.append(batch['index'].tolist())
        if len(batches) == n:
            break
    return batches


def test_resume_mid_epoch_continues_with_next_samples(s3_endpoint, model, tmp_path):  # noqa: F811
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=NUM_SAMPLES, noise=0.25, seed=3, options=QUIET)

    def loader():
        return build_streaming_dataloader(remote, _cache(tmp_path), model.tokenizer, batch_size=8, shuffle_seed=7,
                                          num_workers=2)

    uninterrupted = _first_batches(loader(), 5)
    first = _run(loader(), '2ba', save_folder=str(tmp_path / 'ckpt'), save_interval='2ba',
                 save_filename='ba{batch}.pt')
    assert first == uninterrupted[:2]
    resumed = _run(loader(), '5ba', load_path=str(tmp_path / 'ckpt' / 'ba2.pt'))
    assert resumed == uninterrupted[2:], 'after resuming at batch 2 the loader yields exactly batches 3..5'
    seen = [i for batch in first + resumed for i in batch]
    assert len(seen) == len(set(seen)) == 5 * 8, 'no repeats and no gaps within the epoch'


def test_resume_with_jest_continues_counters(s3_endpoint, model, tmp_path):  # noqa: F811
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=NUM_SAMPLES, noise=0.25, seed=3, options=QUIET)

    def loader(b, f):
        return build_streaming_dataloader(remote, _cache(tmp_path), model.tokenizer, batch_size=superbatch_size(b, f),
                                          shuffle_seed=7)

    superbatches = _first_batches(loader(8, 0.0), 4)  # the super-batch sequence the JEST runs draw from
    first = _run(loader(4, 0.5), '2ba', algorithms=[JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2)],
                 save_folder=str(tmp_path / 'ckpt'), save_interval='2ba', save_filename='ba{batch}.pt')
    jest = JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2)
    resumed = _run(loader(4, 0.5), '4ba', algorithms=[jest], load_path=str(tmp_path / 'ckpt' / 'ba2.pt'))
    assert len(resumed) == 2 and all(len(batch) == 4 for batch in first + resumed)
    for selected, superbatch in zip(first + resumed, superbatches, strict=True):
        assert set(selected) <= set(superbatch), 'each selection comes from the matching super-batch'
    assert jest.examples_seen == 4 * 8 and jest.examples_trained == 4 * 4, 'counters continue from the checkpoint'


def test_unreachable_endpoint_is_one_clear_error(tmp_path, model, monkeypatch, streaming_shm):  # noqa: F811
    url = unreachable_url()
    monkeypatch.setenv('S3_ENDPOINT_URL', url)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIAEXAMPLEKEY')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'very-secret-value')
    with pytest.raises(RemoteAccessError, match='unreachable') as info:
        build_streaming_dataloader('s3://some-bucket/data', _cache(tmp_path), model.tokenizer, batch_size=4)
    message = str(info.value)
    assert 's3://some-bucket/data' in message and url in message and 'very-secret-value' not in message
    with pytest.raises(RemoteAccessError, match='unreachable'):  # and the converter says the same
        convert_shapes('s3://some-bucket/data', num_samples=4, options=QUIET)


def test_wrong_credentials_are_one_clear_error(s3_endpoint, model, tmp_path, monkeypatch):  # noqa: F811
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=16, options=QUIET)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'wrong-secret-value')
    with pytest.raises(RemoteAccessError, match='access denied') as info:
        build_streaming_dataloader(remote, _cache(tmp_path), model.tokenizer, batch_size=4)
    message = str(info.value)
    assert remote in message and s3_endpoint.url in message and 'wrong-secret-value' not in message
    with pytest.raises(RemoteAccessError, match='access denied'):
        convert_shapes(f's3://{s3_endpoint.bucket}/other', num_samples=4, options=QUIET)


def test_missing_dataset_is_one_clear_error(s3_endpoint, model, tmp_path):  # noqa: F811
    with pytest.raises(RemoteAccessError, match='not found'):
        build_streaming_dataloader(f's3://{s3_endpoint.bucket}/nothing-here', _cache(tmp_path), model.tokenizer,
                                   batch_size=4)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_corrupted_shard_names_the_shard(s3_endpoint, model, tmp_path, num_workers):  # noqa: F811
    remote = f's3://{s3_endpoint.bucket}/shapes'
    convert_shapes(remote, num_samples=48, options=QUIET)
    client = s3_endpoint.client()
    index = json.loads(client.get_object(Bucket=s3_endpoint.bucket, Key='shapes/index.json')['Body'].read())
    key = 'shapes/' + index['shards'][3]['zip_data']['basename']  # under the conversion's generation prefix
    data = bytearray(client.get_object(Bucket=s3_endpoint.bucket, Key=key)['Body'].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=s3_endpoint.bucket, Key=key, Body=bytes(data))
    loader = build_streaming_dataloader(remote, _cache(tmp_path), model.tokenizer, batch_size=4,
                                        num_workers=num_workers)
    with pytest.raises(Exception, match=r'shard\.00003\.mds\.zstd.*corrupted') as info:
        for _ in loader:
            pass
    if num_workers == 0:
        assert isinstance(info.value, ShardError)
    del loader


def test_corrupted_local_shard_names_the_shard(tmp_path, model, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'shapes')
    convert_shapes(out, num_samples=24, options=QUIET)
    path = os.path.join(out, 'shard.00001.mds.zstd')
    data = bytearray(open(path, 'rb').read())
    data[-5] ^= 0xFF
    open(path, 'wb').write(bytes(data))
    with pytest.raises(ShardError, match=r'shard\.00001\.mds\.zstd.*corrupted'):  # when opened, before training
        build_streaming_dataloader(None, out, model.tokenizer, batch_size=4, shuffle=False)
