"""README claims about S3 access: the default limits (30 s per connect/read, 6 attempts, backoff 1, 2, 4, 8, 16 s;
the index gets 2) and "credentials come only from the environment and are never logged".

No wall clock: the module's clock is injected (its sleeps are recorded, never slept), and the limits are read
where they take effect (the arguments each download gets, the botocore client's config).
"""

from __future__ import annotations

import logging

import pytest
from s3_server import moto_server, s3_endpoint, streaming_shm, unreachable_url  # noqa: F401

import composer_jest.data.remote as remote
import composer_jest.data.streaming as streaming_module
from composer_jest.data.convert import MDSOptions, convert_shapes
from composer_jest.data.remote import RemoteAccessError, download_s3_file
from composer_jest.data.streaming import ImageTextStreamingDataset

KEY_ID, SECRET = 'AKIACLAIMSTESTKEY000', 'claims-test-secret-value-0123456789'


class FakeClock:
    """Stands in for the ``time`` module inside ``remote``: ``sleep`` records and advances, never waits."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(remote, 'time', fake)
    return fake


def test_default_download_limits_are_30s_6_attempts_and_backoff_1_to_16s(tmp_path, monkeypatch, clock):
    monkeypatch.setenv('S3_ENDPOINT_URL', unreachable_url())
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', KEY_ID)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', SECRET)
    timeouts = []
    real_client = remote._download_client
    monkeypatch.setattr(remote, '_download_client', lambda timeout: timeouts.append(timeout) or real_client(timeout))
    with pytest.raises(RemoteAccessError, match=r'did not answer in 6 attempts .*timeout 30s per connect/read'):
        download_s3_file('s3://bucket/mds/shard.00000.mds', str(tmp_path / 'shard'))  # the defaults
    assert timeouts == [30.0] * 6
    config = real_client(30.0).meta.config
    assert (config.connect_timeout, config.read_timeout, config.retries['total_max_attempts']) == (30.0, 30.0, 1)
    # backoff * 2**k after the k-th failure, plus up to 10% jitter; none after the last attempt
    assert len(clock.sleeps) == 5
    for k, wait in enumerate(clock.sleeps):
        assert 2 ** k <= wait <= 1.1 * 2 ** k, clock.sleeps


def test_the_dataset_passes_the_defaults_and_gives_the_index_2_attempts(s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    remote_url = f's3://{s3_endpoint.bucket}/mds'
    convert_shapes(remote_url, num_samples=8, seed=1, options=MDSOptions(size_limit=1 << 14, progress=False))
    calls = []
    real = streaming_module.download_s3_file

    def record(url, local, **kwargs):
        calls.append((url.rsplit('/', 1)[-1], kwargs))
        return real(url, local, **kwargs)

    monkeypatch.setattr(streaming_module, 'download_s3_file', record)
    ds = ImageTextStreamingDataset(remote=remote_url, local=str(tmp_path / 'cache'), tokenizer=lambda c: c,
                                   shuffle=False, batch_size=1)
    ds[0]
    assert calls[0] == ('index.json', {'attempts': 2, 'timeout': 30.0}), calls
    shards = [kwargs for name, kwargs in calls if name.startswith('shard.')]
    assert shards and all(kwargs == {'attempts': 6, 'timeout': 30.0} for kwargs in shards), calls
    del ds


def _leaks(records: list[logging.LogRecord], text: str, *values: str) -> list[str]:
    found = [r.getMessage() for r in records if any(v in r.getMessage() for v in values)]
    return found + ([text] if any(v in text for v in values) else [])


def _ours_or_warnings(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """This package's records at any level, and every logger's warnings and errors (botocore's DEBUG records, off by
    default, print signed request headers and URLs: the user's choice, not ours)."""
    return [r for r in records if r.name.startswith('composer_jest') or r.levelno >= logging.WARNING]


def test_credentials_are_never_logged(s3_endpoint, tmp_path, monkeypatch, caplog, capfd, clock):  # noqa: F811
    """A download retried against a dead endpoint, then one refused for wrong credentials, with every logger at
    DEBUG: the secret reaches no log record at all; the access key id no record of ours nor any warning, nor the
    errors, nor the console."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', KEY_ID)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', SECRET)
    monkeypatch.setenv('S3_ENDPOINT_URL', unreachable_url())
    with pytest.raises(RemoteAccessError) as dead:
        download_s3_file('s3://bucket/mds/shard.00000.mds', str(tmp_path / 'a'), attempts=3)
    monkeypatch.setenv('S3_ENDPOINT_URL', s3_endpoint.url)  # a live store that does not know these credentials
    with pytest.raises(RemoteAccessError) as refused:
        download_s3_file(f's3://{s3_endpoint.bucket}/x/shard.00000.mds', str(tmp_path / 'b'))
    assert len([r for r in caplog.records if 'waiting for' in r.getMessage()]) == 2  # the retries were logged
    out, err = capfd.readouterr()
    errors = f'{dead.value}\n{refused.value}\n{out}\n{err}'
    assert not _leaks(caplog.records, errors, SECRET), 'the secret reached a log'
    assert not _leaks(_ours_or_warnings(caplog.records), errors, KEY_ID), 'the access key id reached a log'


def test_credentials_in_the_endpoint_url_are_redacted(tmp_path, monkeypatch, caplog, capfd, clock):
    """Every retry names the endpoint: one that carries the credentials (http://KEY:SECRET@host) is redacted in the
    warnings and the error."""
    port = unreachable_url().rsplit(':', 1)[-1]
    monkeypatch.setenv('S3_ENDPOINT_URL', f'http://{KEY_ID}:{SECRET}@127.0.0.1:{port}')
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', KEY_ID)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', SECRET)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RemoteAccessError) as info:
        download_s3_file('s3://bucket/mds/shard.00000.mds', str(tmp_path / 'shard'), attempts=3)
    waits = [r for r in caplog.records if r.name == remote.log.name and 'waiting for' in r.getMessage()]
    assert len(waits) == 2 and all('http://***:***@127.0.0.1:' in r.getMessage() for r in waits), \
        [r.getMessage() for r in waits]  # the endpoint is named, its credentials are not
    out, err = capfd.readouterr()
    assert not _leaks(_ours_or_warnings(caplog.records), f'{info.value}\n{out}\n{err}', SECRET, KEY_ID)
