"""The shared MDS writer's row API (``write_rows``, used by ``composer-jest filter``) and the one remote-error
translation (``remote_errors``)."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from convert_helpers import QUIET, _read
from s3_server import moto_server, s3_endpoint, streaming_shm  # noqa: F401  (pytest fixtures)

from composer_jest.data.convert import SUMMARY_FILE, ConversionError, MDSOptions, write_rows
from composer_jest.data.remote import RemoteAccessError, remote_errors

COLUMNS = {'caption': 'str', 'score': 'float64', 'meta': 'json'}
OVERWRITE = MDSOptions(size_limit=4_000, progress=False, overwrite=True)


def _rows(n: int, tag: str = 'a', counts: dict | None = None, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f'source failed at row {i}')
        if counts is not None:
            counts['kept'] = counts.get('kept', 0) + 1
        yield {'caption': f'{tag} caption {i}', 'score': i / 4, 'meta': {'source': 10 * i}, 'index': 99}


def test_rows_are_written_as_given_numbered_and_summarised(tmp_path, streaming_shm):  # noqa: F811
    out = tmp_path / 'filtered'
    counts: dict = {}
    summary = write_rows(_rows(7, counts=counts), str(out), COLUMNS, options=QUIET, number='index',
                         summary_extra=counts)
    assert summary.written == 7 and summary.columns == {**COLUMNS, 'index': 'int'}
    samples = _read(str(out))
    assert [s['index'] for s in samples] == list(range(7))  # `number` replaces the rows' own value (99)
    assert [s['caption'] for s in samples] == [f'a caption {i}' for i in range(7)]
    assert [s['score'] for s in samples] == [i / 4 for i in range(7)]
    assert [s['meta'] for s in samples] == [{'source': 10 * i} for i in range(7)]
    record = json.loads((out / SUMMARY_FILE).read_text())
    assert record['written'] == 7 and record['kept'] == 7, 'summary_extra is read after the last row'
    assert len(list((out).glob('shard.*.mds*'))) > 1, 'several shards (size_limit)'


def test_rows_without_number_keep_their_columns(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'as_is')
    rows = [{'caption': f'c{i}', 'index': 10 + i} for i in range(3)]
    write_rows(rows, out, {'caption': 'str', 'index': 'int'}, options=QUIET)
    assert [s['index'] for s in _read(out)] == [10, 11, 12]


def test_overwrite_semantics_and_a_failed_write_leave_the_old_dataset(tmp_path, streaming_shm):  # noqa: F811
    out = tmp_path / 'data'
    write_rows(_rows(5), str(out), COLUMNS, options=QUIET, number='index')
    with pytest.raises(FileExistsError, match='overwrite'):
        write_rows(_rows(3, tag='b'), str(out), COLUMNS, options=QUIET)
    with pytest.raises(RuntimeError, match='source failed at row 2'):
        write_rows(_rows(4, tag='b', fail_at=2), str(out), COLUMNS, options=OVERWRITE, number='index')
    assert [s['caption'] for s in _read(str(out))] == [f'a caption {i}' for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data'], 'no staging directory left behind'
    with pytest.raises(ConversionError, match='no samples written'):
        write_rows([], str(out), COLUMNS, options=OVERWRITE)
    write_rows(_rows(2, tag='b'), str(out), COLUMNS, options=OVERWRITE, number='index')
    assert [s['caption'] for s in _read(str(out))] == ['b caption 0', 'b caption 1']


def test_rows_to_s3_publish_atomically(s3_endpoint, tmp_path):  # noqa: F811
    client = s3_endpoint.client()
    out = f's3://{s3_endpoint.bucket}/filtered'
    write_rows(_rows(4), out, COLUMNS, options=QUIET, number='index', summary_extra={'dropped': 3})
    keys = lambda: {o['Key'] for o in client.list_objects_v2(Bucket=s3_endpoint.bucket)['Contents']}  # noqa: E731
    before = keys()
    assert {'filtered/index.json', f'filtered/{SUMMARY_FILE}'} <= before
    record = json.loads(client.get_object(Bucket=s3_endpoint.bucket, Key=f'filtered/{SUMMARY_FILE}')['Body'].read())
    assert record['written'] == 4 and record['dropped'] == 3
    with pytest.raises(RuntimeError, match='source failed'):
        write_rows(_rows(3, fail_at=1), out, COLUMNS, options=OVERWRITE, number='index')
    assert keys() == before, 'a failed overwrite leaves the previous objects, and only them'
    local = tmp_path / 'cache'
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=out, local=str(local), shuffle=False, batch_size=1)
    assert [ds[i]['caption'] for i in range(ds.num_samples)] == [f'a caption {i}' for i in range(4)]


# -- remote_errors: the one translation of object-store failures ------------------------------------------
def _client_error(code: str, status: int) -> ClientError:
    return ClientError({'Error': {'Code': code, 'Message': 'x'}, 'ResponseMetadata': {'HTTPStatusCode': status}},
                       'GetObject')


@pytest.mark.parametrize(('error', 'action', 'message'), [
    (_client_error('AccessDenied', 403), 'read', r'cannot read s3://b/k: access denied by .*AccessDenied'),
    (_client_error('NoSuchBucket', 404), 'write', r'cannot write s3://b/k: the bucket does not exist'),
    (_client_error('NoSuchKey', 404), 'list', r'cannot list s3://b/k: not found at'),
    (EndpointConnectionError(endpoint_url='http://x'), 'download', r'cannot download s3://b/k: the S3 endpoint'),
])
def test_remote_errors_translates_botocore_failures(error, action, message, monkeypatch):
    monkeypatch.delenv('S3_ENDPOINT_URL', raising=False)
    with pytest.raises(RemoteAccessError, match=message) as info:
        with remote_errors('s3://b/k', action):
            raise error
    assert info.value.__suppress_context__, 'the botocore traceback is not chained'


def test_remote_errors_passes_other_errors_unchanged():
    with pytest.raises(KeyError):  # not an object-store failure
        with remote_errors('s3://b/k'):
            raise KeyError('x')
    already = RemoteAccessError('cannot read s3://input/a.tar: ...')
    with pytest.raises(RemoteAccessError) as info:  # already translated (about another object): not renamed
        with remote_errors('s3://b/out', 'write'):
            try:
                raise _client_error('AccessDenied', 403)
            except ClientError:
                raise already from None
    assert info.value is already
    with pytest.raises(ConversionError):  # `keep`: e.g. an input error whose context holds a botocore error
        with remote_errors('s3://b/out', 'write', keep=(ConversionError,)):
            try:
                raise _client_error('AccessDenied', 403)
            except ClientError:
                raise ConversionError('a.tar: unreadable tar shard') from None
