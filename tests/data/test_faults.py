"""Faults and bad files, as an operator meets them: each test breaks one thing and checks the error or recovery.

Checkpoints (unsafe pickles, non-checkpoints, other architectures, a truncated latest checkpoint), conversion
(a failed ``--overwrite`` keeps the old dataset, locally and on S3; encodings; caption counts), shards (corrupted
or truncated in a local dir or the cache; a corrupt cached index), a flaky or frozen S3 endpoint, and
non-finite scores named by their source. Everything runs on local files or the moto endpoint; no test reads
the wall clock: a frozen store is bounded by the clients' timeouts (checked in their config) and faults are
injected on events (a logged retry, a requested shard), not after a delay.
"""

from __future__ import annotations

import csv
import fractions
import json
import logging
import os
import re
import signal
import warnings

import pytest
import torch
from composer import Callback, Trainer
from convert_helpers import QUIET, _make_folder, _read, _write_csv
from model_helpers import fit, make_model
from s3_server import S3Endpoint, moto_server, s3_endpoint, start_moto_server, streaming_shm, unreachable_url  # noqa: F401
from streaming import StreamingDataset

import composer_jest.data.streaming as streaming_module
from composer_jest import JEST
from composer_jest.data import shapes_dataloader
from composer_jest.data.convert import (
    SUMMARY_FILE,
    BadSampleError,
    CaptionCheck,
    ConversionError,
    MDSOptions,
    convert_folder,
    convert_shapes,
    main,
)
from composer_jest.data.demo.shapes import ShapesDataset
from composer_jest.data.remote import RemoteAccessError, _download_client, download_s3_file
from composer_jest.data.streaming import ImageTextStreamingDataset, ShardError, build_streaming_dataloader
from composer_jest.models.checkpoint import CheckpointError, check_resumable
from composer_jest.models.clip import checkpoint_state_dict

OTHER_ARCH = {  # jest-tiny with a wider text tower: same keys, other shapes
    'embed_dim': 64, 'init_logit_bias': -10.0,
    'vision_cfg': {'image_size': 32, 'patch_size': 8, 'width': 128, 'layers': 2, 'head_width': 32},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 4, 'layers': 2},
}


@pytest.fixture(scope='module')
def composer_checkpoint(tmp_path_factory):
    """A real Composer checkpoint of a jest-tiny CLIPModel (model, optimizer, RNG states, timestamp)."""
    folder = tmp_path_factory.mktemp('ckpt')
    trainer = Trainer(model=make_model(seed=3), max_duration='1ba', progress_bar=False)
    trainer.save_checkpoint(str(folder / 'learner.pt'))
    trainer.close()
    return folder / 'learner.pt'


# -- 1. checkpoints are loaded safely ------------------------------------------------------------------------
def test_composer_checkpoint_loads_with_weights_only(composer_checkpoint):
    weights = checkpoint_state_dict(composer_checkpoint)
    assert weights['logit_scale'].shape == (1,) and 'visual.conv1.weight' in weights


def test_checkpoint_holding_a_python_object_is_refused(composer_checkpoint, tmp_path):
    obj = torch.load(composer_checkpoint, weights_only=False)  # the test's own file: trusted
    obj['state']['extra'] = fractions.Fraction(1, 3)  # any class: unpickling it may run its code
    evil = tmp_path / 'downloaded.pt'
    torch.save(obj, evil)
    with pytest.raises(CheckpointError, match=r'downloaded\.pt: refused to load.*fractions\.Fraction'):
        JEST(reference=str(evil), filter_ratio=0.5)
    with pytest.raises(CheckpointError, match='refused'):
        checkpoint_state_dict(evil)  # model.checkpoint and embed-reference --checkpoint load through this


def test_non_checkpoint_file_is_named_at_construction(tmp_path):
    text = tmp_path / 'reference.pt'
    text.write_text('<html>403 Forbidden</html>')
    with pytest.raises(CheckpointError, match=r'reference\.pt: not a PyTorch checkpoint'):
        JEST(reference=str(text), filter_ratio=0.5)


def test_reference_of_another_architecture_fails_at_construction(composer_checkpoint):
    with pytest.raises(ValueError, match=r"learner\.pt' does not fit.*shape mismatches.*text_projection") as info:
        JEST(reference={'model': OTHER_ARCH, 'checkpoint': str(composer_checkpoint)}, filter_ratio=0.5)
    assert str(composer_checkpoint) in str(info.value)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model = make_model(seed=0)
    loader = lambda: shapes_dataloader(model.tokenizer, 3 * 8, 8, seed=1)  # noqa: E731
    kwargs = dict(save_folder=str(tmp_path), save_interval='1ba', save_filename='ba{batch}.pt', run_name='r')
    fit(model, loader(), steps=2, **kwargs)[0].close()
    latest = tmp_path / 'latest-rank0.pt'
    assert os.readlink(latest) == 'ba2.pt'
    with open(tmp_path / 'ba2.pt', 'r+b') as f:  # the process died while writing it
        f.truncate(os.path.getsize(tmp_path / 'ba2.pt') // 2)
    with pytest.warns(UserWarning, match=r'ba2\.pt is truncated.*resuming from the previous valid checkpoint .*ba1'):
        assert check_resumable(str(tmp_path)) == str(tmp_path / 'ba1.pt')
    assert os.readlink(latest) == 'ba1.pt' and (tmp_path / 'ba2.pt.corrupt').exists()
    trainer, _ = fit(make_model(seed=0), loader(), steps=3, autoresume=True, **kwargs)
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()


# -- 2. a failed conversion keeps the previous dataset -------------------------------------------------------
def _bad_overwrite(tmp_path, out: str) -> None:
    """``convert folder --overwrite`` over ``out`` from a CSV whose row 4 names a missing image: fails."""
    rows = _make_folder(tmp_path / 'src', n=6, bad={3: 'missing_file'})
    _write_csv(tmp_path / 'src' / 'captions.csv', rows)
    overwrite = MDSOptions(size_limit=4_000, progress=False, overwrite=True)
    with pytest.raises(BadSampleError, match=r'captions\.csv:5'):
        convert_folder(tmp_path / 'src' / 'captions.csv', out, options=overwrite)


def test_failed_local_overwrite_keeps_the_previous_dataset(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'mds')
    convert_shapes(out, num_samples=12, seed=4, options=QUIET)
    before = [s['caption'] for s in _read(out)]
    _bad_overwrite(tmp_path, out)
    assert [s['caption'] for s in _read(out)] == before and len(before) == 12
    assert sorted(os.listdir(tmp_path)) == ['mds', 'src'], 'no staging directory is left behind'
    convert_shapes(out, num_samples=5, options=MDSOptions(size_limit=4_000, progress=False, overwrite=True))
    assert len(_read(out)) == 5 and sorted(os.listdir(tmp_path)) == ['mds', 'src']


def test_failed_s3_overwrite_keeps_the_previous_dataset(s3_endpoint, tmp_path):  # noqa: F811
    out = f's3://{s3_endpoint.bucket}/mds'
    convert_shapes(out, num_samples=12, seed=4, options=QUIET)
    keys = lambda: {o['Key'] for o in s3_endpoint.client().list_objects_v2(  # noqa: E731
        Bucket=s3_endpoint.bucket, Prefix='mds/')['Contents']}
    before = keys()
    _bad_overwrite(tmp_path, out)
    assert keys() == before
    ds = StreamingDataset(remote=out, local=str(tmp_path / 'cache'), shuffle=False, batch_size=1)
    assert sorted(int(ds[i]['index']) for i in range(ds.num_samples)) == list(range(12))
    del ds
    # a successful overwrite replaces it and deletes the old shards (after the new index is in place)
    convert_shapes(out, num_samples=5, options=MDSOptions(size_limit=4_000, progress=False, overwrite=True))
    index = json.loads(s3_endpoint.client().get_object(Bucket=s3_endpoint.bucket, Key='mds/index.json')['Body'].read())
    referenced = {f'mds/{s["zip_data"]["basename"]}' for s in index['shards']}
    assert keys() == referenced | {'mds/index.json', f'mds/{SUMMARY_FILE}'}
    assert sum(s['samples'] for s in index['shards']) == 5


# -- 5. conversion: encodings and caption counts -------------------------------------------------------------
def _captions_csv(tmp_path, captions: list[str], encoding: str = 'utf-8'):
    rows = _make_folder(tmp_path, n=len(captions))
    for row, caption in zip(rows, captions):
        row['caption'] = caption
    path = tmp_path / 'captions.csv'
    with open(path, 'w', newline='', encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=['file_name', 'caption'], extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_latin1_captions_name_the_file_and_take_an_encoding(tmp_path, streaming_shm):  # noqa: F811
    path = _captions_csv(tmp_path, ['a red dress', 'un café noir', 'a shoe'], encoding='latin-1')
    with pytest.raises(ConversionError, match=r'captions\.csv:3: not valid utf-8 text.*--encoding'):
        convert_folder(path, str(tmp_path / 'mds'), options=QUIET, skip_bad=True)
    assert main(['folder', '--captions', str(path), '--out', str(tmp_path / 'mds'), '--encoding', 'latin-1',
                 '--no-progress']) == 0
    assert [s['caption'] for s in _read(str(tmp_path / 'mds'))] == ['a red dress', 'un café noir', 'a shoe']


def test_empty_and_long_captions_are_counted(tmp_path, streaming_shm):  # noqa: F811
    long = ' '.join(['word'] * 100)  # > 77 CLIP tokens: a 77-token model trains on a truncated caption
    path = _captions_csv(tmp_path, ['a red dress', '  ', long, 'a shoe'])
    summary = convert_folder(path, str(tmp_path / 'mds'), options=QUIET, skip_bad=True)
    recorded = json.load(open(tmp_path / 'mds' / SUMMARY_FILE))
    assert (summary.written, summary.skipped) == (3, 1)
    assert (recorded['empty_captions'], recorded['long_captions'], recorded['caption_context']) == (1, 1, 77)
    rejected = convert_folder(path, str(tmp_path / 'strict'), options=QUIET, skip_bad=True,
                              captions_check=CaptionCheck(context=77, reject_long=True))
    assert (rejected.written, rejected.skipped, rejected.long_captions) == (2, 2, 1)
    assert any('longer than 77 tokens' in s for s in rejected.skipped_examples)


# -- 5. non-finite scores name their source and step ---------------------------------------------------------
def _jest_fit(learner, reference, steps: int = 1, lr: float = 1e-3, batches=None):
    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=2, seed=0)
    loader = batches if batches is not None else shapes_dataloader(learner.tokenizer, steps * 16, 16, seed=2)
    return fit(learner, loader, steps=steps, algorithms=[jest], lr=lr, warmup=0, device_train_microbatch_size=8)


def _poisoned(model):
    with torch.no_grad():
        model.towers.clip.visual.conv1.weight[0] = float('nan')
    return model


def test_nan_learner_is_named():
    with pytest.raises(FloatingPointError, match=r'learner scoring.*at step 0'):
        _jest_fit(_poisoned(make_model(seed=1)), make_model(seed=3))


def test_diverging_learner_is_named_with_its_step():
    with pytest.raises(FloatingPointError, match=r'learner scoring.*at step [1-9]'):
        _jest_fit(make_model(seed=1), make_model(seed=3), steps=4, lr=1e6)


def test_nan_reference_is_named(composer_checkpoint, tmp_path):
    with pytest.raises(FloatingPointError, match=r'reference model.*at step 0'):
        _jest_fit(make_model(seed=1), _poisoned(make_model(seed=3)))
    obj = torch.load(composer_checkpoint, weights_only=False)
    obj['state']['model']['towers.clip.visual.conv1.weight'][0] = float('inf')
    torch.save(obj, tmp_path / 'diverged.pt')
    with pytest.raises(ValueError, match=r"diverged\.pt' has NaN or inf weights in \['visual\.conv1\.weight'\]"):
        JEST(reference={'model': 'jest-tiny', 'checkpoint': str(tmp_path / 'diverged.pt')})


def test_nan_cached_reference_columns_are_named():
    learner = make_model(seed=1)
    batches = []
    for batch in shapes_dataloader(learner.tokenizer, 16, 16, seed=2):
        n = batch['image'].shape[0]
        batch.update(ref_image_features=torch.full((n, 64), float('nan'), dtype=torch.float16),
                     ref_text_features=torch.zeros(n, 64, dtype=torch.float16),
                     ref_logit_scale=torch.full((n,), 10.0), ref_logit_bias=torch.full((n,), -10.0))
        batches.append(batch)
    with pytest.raises(FloatingPointError, match=r"\['image_features'\] from the cached reference columns.*step 0"):
        _jest_fit(learner, 'cached', batches=batches)


def test_resuming_with_other_jest_settings_warns():
    saved = JEST(reference='cached', filter_ratio=0.5, n_chunks=4, seed=0).state_dict()
    with pytest.warns(UserWarning, match=r"filter_ratio: 0\.5 -> 0\.8; n_chunks: 4 -> 16"):
        JEST(reference='cached', filter_ratio=0.8, n_chunks=16, seed=0).load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the same settings: silent
        JEST(reference='cached', filter_ratio=0.5, n_chunks=4, seed=0).load_state_dict(saved)


# -- 3. shards on disk are checked before they are trusted ---------------------------------------------------
def _captions(remote, local) -> list[str]:
    ds = ImageTextStreamingDataset(remote=remote, local=local, tokenizer=lambda c: torch.zeros(len(c), 4),
                                   keep_caption=True, shuffle=False, batch_size=1)
    try:
        return [ds[i]['caption'] for i in range(ds.num_samples)]
    finally:
        del ds


def _files(root, suffix: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(suffix))


def _rewrite_caption(path: str, caption: str) -> None:
    """Overwrite ``caption``'s bytes in a raw shard in place (same length: only a hash can tell)."""
    data = open(path, 'rb').read()
    assert caption.encode() in data
    open(path, 'wb').write(data.replace(caption.encode(), b'Z' * len(caption.encode()), 1))


def test_corrupted_or_truncated_local_shard_fails_before_training(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'mds')
    convert_shapes(out, num_samples=24, seed=4, options=MDSOptions(size_limit=4_000, progress=False,
                                                                  compression=None))
    shard = _files(out, '.mds')[1]
    _rewrite_caption(shard, ShapesDataset(24, seed=4).example(_first_index(shard))['caption'])
    with pytest.raises(ShardError, match=r'shard shard\.00001\.mds of .* is corrupted: its xxh64 hash'):
        ImageTextStreamingDataset(local=out, tokenizer=lambda c: c, batch_size=1)
    os.truncate(shard, 100)
    with pytest.raises(ShardError, match=r'shard\.00001\.mds .*100 bytes on disk'):
        ImageTextStreamingDataset(local=out, tokenizer=lambda c: c, batch_size=1)


def _first_index(shard_path: str) -> int:
    """The ``index`` of the first sample of a raw MDS shard (samples are written in order)."""
    index = json.load(open(os.path.join(os.path.dirname(shard_path), 'index.json')))
    names = [s['raw_data']['basename'] for s in index['shards']]
    return sum(s['samples'] for s in index['shards'][:names.index(os.path.basename(shard_path))])


def test_damaged_cache_is_fetched_again_from_the_remote(s3_endpoint, tmp_path):  # noqa: F811
    remote, cache = f's3://{s3_endpoint.bucket}/mds', str(tmp_path / 'cache')
    convert_shapes(remote, num_samples=24, seed=4, options=QUIET)
    expected = [ShapesDataset(24, seed=4).example(i)['caption'] for i in range(24)]
    assert _captions(remote, cache) == expected  # fills the cache (decompressed shards)
    shards = _files(cache, '.mds')
    _rewrite_caption(shards[0], expected[0])  # bit rot, same length
    os.truncate(shards[2], 100)  # a partial write
    assert _captions(remote, cache) == expected, 'damaged cached shards are fetched again'
    with open(os.path.join(cache, 'index.json'), 'w') as f:
        f.write('{"version": 2, "shards": [')  # a cut-off index
    assert _captions(remote, cache) == expected, 'a corrupt cached index.json is fetched again'


# -- 4. a flaky or frozen object store -----------------------------------------------------------------------
@pytest.fixture
def own_store(monkeypatch, streaming_shm):  # noqa: F811
    """A moto endpoint of this test's own (it gets frozen), holding 48 shapes at s3://faults/mds (one per shard)."""
    server = start_moto_server()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        S3Endpoint(server.url, 'faults', server).client().create_bucket(Bucket='faults')
        convert_shapes('s3://faults/mds', num_samples=48, seed=4, options=QUIET)
        yield server
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()


def test_frozen_store_fails_within_the_timeout_naming_what_it_waits_for(own_store, tmp_path, caplog):
    ds = ImageTextStreamingDataset(remote='s3://faults/mds', local=str(tmp_path / 'cache'), tokenizer=lambda c: c,
                                   shuffle=False, batch_size=1, download_timeout=1, download_retry=2)
    os.kill(own_store.pid, signal.SIGSTOP)  # the endpoint accepts connections and never answers
    with pytest.raises(ShardError, match=r'cannot download s3://faults/mds/.*shard\.00000.*did not answer in 2 '
                                         r'attempts.*timeout 1s'):
        ds[0]
    # what bounds the wait (no wall clock): each attempt's client gives up after 1 s per connect and per read, with
    # no retries of its own; two attempts; one backoff of 1 s (+ up to 10% jitter) between them, announced
    config = _download_client(1.0).meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries['total_max_attempts']) == (1.0, 1.0, 1)
    waits = [r.message for r in caplog.records if r.message.startswith('waiting for s3://faults/mds/')]
    assert len(waits) == 1 and 'attempt 1/2 failed' in waits[0], waits
    assert re.search(r'retrying in 1\.[01]s$', waits[0]), waits
    del ds


def test_frozen_store_with_loader_workers_is_one_error(own_store, tmp_path, capfd):
    loader = build_streaming_dataloader('s3://faults/mds', str(tmp_path / 'cache'), lambda c: c, batch_size=4,
                                        num_workers=2, shuffle=False, predownload=4, download_timeout=1,
                                        download_retry=2)
    os.kill(own_store.pid, signal.SIGSTOP)
    with pytest.raises(ShardError, match=r'did not answer in 2 attempts'):
        for _ in loader:
            pass
    assert 'Traceback' not in capfd.readouterr().err, 'no traceback printed per download thread or worker'
    del loader


class _OnFirstWait(logging.Handler):
    """Calls ``action`` once, when the first 'waiting for' warning is logged (an attempt failed, backoff begins)."""

    def __init__(self, action):
        super().__init__(logging.WARNING)
        self.action, self.fired = action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith('waiting for '):
            self.fired = True
            self.action()


def test_store_back_within_the_retry_window_is_waited_for(own_store, tmp_path, caplog):
    ds = ImageTextStreamingDataset(remote='s3://faults/mds', local=str(tmp_path / 'cache'), tokenizer=lambda c: c,
                                   shuffle=False, batch_size=1, keep_caption=True, download_timeout=2,
                                   download_retry=4)
    os.kill(own_store.pid, signal.SIGSTOP)
    # the store comes back when the first attempt has failed (an event, not a timer): a later attempt gets through
    back = _OnFirstWait(lambda: os.kill(own_store.pid, signal.SIGCONT))
    logging.getLogger('composer_jest.data.remote').addHandler(back)
    try:
        captions = [ds[i]['caption'] for i in range(ds.num_samples)]
    finally:
        logging.getLogger('composer_jest.data.remote').removeHandler(back)
    assert back.fired, 'the first download met the frozen store'
    assert captions == [ShapesDataset(48, seed=4).example(i)['caption'] for i in range(48)]
    waits = [r.message for r in caplog.records if r.message.startswith('waiting for s3://faults/mds/')]
    assert waits and all('from the S3 endpoint http://127.0.0.1:' in m for m in waits), 'it says what it waits for'
    assert any(r.message.startswith('downloaded s3://faults/mds/') and 'after 2 attempts' in r.message
               for r in caplog.records) or len(waits) > 1, 'a retry, not the first attempt, got the shard'
    del ds


def test_unreachable_store_is_retried_then_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv('S3_ENDPOINT_URL', unreachable_url())
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'AKIAEXAMPLEKEY')
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'not-a-real-secret')
    with pytest.raises(RemoteAccessError, match=r'did not answer in 3 attempts.*EndpointConnectionError') as info:
        download_s3_file('s3://b/x/shard.00000.mds', str(tmp_path / 'x'), attempts=3, timeout=1, backoff=0.1)
    assert 'not-a-real-secret' not in str(info.value) and not (tmp_path / 'x').exists()


class _Record(Callback):
    """Trained indices and losses per batch."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.losses: list[torch.Tensor] = []

    def after_dataloader(self, state, logger) -> None:
        self.batches.append(state.batch['index'].tolist())

    def batch_end(self, state, logger) -> None:
        self.losses.append(state.loss.detach().clone())


def _freeze_at_shard(monkeypatch, store_pid: int, first: int) -> None:
    """Freeze the store (SIGSTOP) when the shard holding sample ``first`` is first requested, whatever the timing.

    With ``predownload=0`` (and no shuffle, no workers) streaming's download thread requests the shard of sample
    ``p`` only once the reader has asked for sample ``p``: every sample before ``first`` was read from a shard
    fetched before the freeze, and the reader stops (one ShardError) at ``first`` itself, never before.
    """
    real = streaming_module.download_s3_file

    def download(url, local, **kwargs):
        shard = re.search(r'shard\.(\d+)\.mds', url)  # one sample per shard: shard.00024.mds(.zstd) holds sample 24
        if shard and int(shard.group(1)) >= first:
            os.kill(store_pid, signal.SIGSTOP)
        return real(url, local, **kwargs)

    monkeypatch.setattr(streaming_module, 'download_s3_file', download)


def _store_run(record: _Record, tmp_path, cache: str, **kwargs) -> _Record:
    model = make_model(seed=1)
    loader = build_streaming_dataloader('s3://faults/mds', str(tmp_path / cache), model.tokenizer, batch_size=8,
                                        shuffle=False, predownload=0, download_timeout=1,
                                        download_retry=2)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration='6ba', seed=0, device='cpu',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), callbacks=[record],
                      algorithms=[JEST(score='hard_learner', filter_ratio=0.5, n_chunks=2, seed=0)],
                      progress_bar=False, log_to_console=False, loggers=[], **kwargs)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return record


def test_store_dying_mid_run_then_autoresume_is_bit_exact(own_store, tmp_path, monkeypatch):
    """The store freezes when sample 24 is first needed (48 samples, one per shard; 8 per step: step 4 reads
    samples 24-31): the run fails with one ShardError after 3 saved steps; with the store back, ``autoresume``
    from save_folder continues exactly as a run that never failed."""
    uninterrupted = _store_run(_Record(), tmp_path, 'cache-a')
    save = dict(save_folder=str(tmp_path / 'ckpt'), save_interval='1ba', save_num_checkpoints_to_keep=1,
                run_name='flaky', autoresume=True)
    failed = _Record()
    with monkeypatch.context() as frozen:
        _freeze_at_shard(frozen, own_store.pid, first=24)
        with pytest.raises(ShardError, match=r'cannot download .*shard\.00024.*did not answer in 2 attempts'):
            _store_run(failed, tmp_path, 'cache-b', **save)
    assert len(failed.losses) == 3 and failed.batches[:3] == uninterrupted.batches[:3]
    os.kill(own_store.pid, signal.SIGCONT)
    resumed = _store_run(_Record(), tmp_path, 'cache-c', **save)
    assert resumed.batches == uninterrupted.batches[3:], 'the same selections from the same super-batches'
    assert all(torch.equal(a, b) for a, b in zip(resumed.losses, uninterrupted.losses[3:], strict=True))


def test_yaml_load_path_and_model_checkpoint_are_loaded_safely(composer_checkpoint, tmp_path):
    from composer_jest.run.builders import build_model, build_trainer
    from composer_jest.run.config import load_config

    obj = torch.load(composer_checkpoint, weights_only=False)
    obj['state']['extra'] = fractions.Fraction(1, 3)
    torch.save(obj, tmp_path / 'evil.pt')
    with pytest.raises(CheckpointError, match=r'evil\.pt: refused'):  # before Composer unpickles it
        build_trainer(load_config(None, [f'load_path={tmp_path / "evil.pt"}', 'eval_loader=null']))
    with pytest.raises(CheckpointError, match=r'evil\.pt: refused'):
        build_model(load_config(None, [f'model.checkpoint={tmp_path / "evil.pt"}']).model)
    with pytest.raises(ValueError, match=r"learner\.pt' does not fit .*text_projection"):
        build_model(load_config(None, [f'model.checkpoint={composer_checkpoint}', 'model.name=jest-vit-b-16']).model)
