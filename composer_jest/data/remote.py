"""Object-store helpers shared by conversion and reading: one clear error for S3 failures.

Downloads of shards from ``s3://`` (:func:`download_s3_file`) bound every attempt by a timeout on connecting
and on each read (a frozen endpoint fails the attempt instead of waiting forever), retry transient failures
(unreachable or frozen endpoint, 5xx, throttling) with exponential backoff, logging what they wait for,
and end in one :class:`RemoteAccessError` naming the object, the endpoint and the attempts.

Credentials come only from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``…,
as boto3 resolves them); a custom endpoint (MinIO, moto, R2…) from ``S3_ENDPOINT_URL``, the variable
mosaicml-streaming reads too. Error messages name the remote and the endpoint, never a credential.
"""

from __future__ import annotations

import logging
import os
import random
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

__all__ = ['RemoteAccessError', 'is_remote', 'split_s3_url', 's3_client', 'describe_remote_error', 'remote_errors',
           'check_s3_prefix', 'list_s3_objects', 'open_s3_object', 'delete_s3_object', 'download_s3_file', 'redact']

log = logging.getLogger(__name__)

# botocore error codes that mean "your credentials are wrong or not allowed here".
_AUTH_CODES = {'403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'InvalidToken',
               'ExpiredToken', 'AuthorizationHeaderMalformed', 'InvalidClientTokenId', 'Forbidden'}
_NOT_FOUND_CODES = {'404', 'NoSuchKey', 'NoSuchBucket', 'NotFound'}
_SECRET_ENV = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN')


class RemoteAccessError(RuntimeError):
    """The object store could not be used: unreachable endpoint, bad credentials, missing bucket/object."""


def is_remote(path: Optional[str]) -> bool:
    """Whether ``path`` is a URL (``s3://…``, ``gs://…``) rather than a local path."""
    return bool(path) and urllib.parse.urlparse(str(path)).scheme not in ('', 'file')


def split_s3_url(url: str) -> tuple[str, str]:
    """``'s3://bucket/a/b'`` -> ``('bucket', 'a/b')``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != 's3' or not parsed.netloc:
        raise ValueError(f'expected an s3://bucket/prefix URL, got {url!r}')
    return parsed.netloc, parsed.path.lstrip('/')


def s3_client(connect_timeout: float = 10.0, max_attempts: int = 3, read_timeout: float = 60.0) -> Any:
    """A boto3 S3 client configured from the environment, like streaming's own (``S3_ENDPOINT_URL``)."""
    import boto3
    from botocore.config import Config

    # total_max_attempts counts the first try (botocore's max_attempts counts retries only: 1 would be 2 tries)
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={'total_max_attempts': max_attempts, 'mode': 'standard'})
    return boto3.session.Session().client('s3', config=config, endpoint_url=os.environ.get('S3_ENDPOINT_URL'))


def redact(text: str) -> str:
    """``text`` with any credential value from the environment replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, '***')
    return text


def _endpoint() -> str:
    return os.environ.get('S3_ENDPOINT_URL') or 'the default AWS endpoint (S3_ENDPOINT_URL is not set)'


def describe_remote_error(exc: BaseException, remote: str, action: str = 'read') -> Optional[RemoteAccessError]:
    """Translate a botocore failure while using ``remote`` into one :class:`RemoteAccessError`.

    Returns ``None`` when ``exc`` is not an object-store failure (so callers can re-raise it as is).
    """
    try:
        import botocore.exceptions  # noqa: F401
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:  # the botocore error may be wrapped (e.g. by streaming's retry)
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:
        translated = _translate(err, remote, action, _endpoint())
        if translated is not None:
            return translated
    return None


def _translate(err: BaseException, remote: str, action: str, endpoint: str) -> Optional[RemoteAccessError]:
    """One botocore exception as a :class:`RemoteAccessError` (``None`` if ``err`` is not one)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    if isinstance(err, EndpointConnectionError) or (
        isinstance(err, BotoCoreError) and 'connect' in type(err).__name__.lower()
    ):
        msg = f'cannot {action} {remote}: the S3 endpoint {endpoint} is unreachable ({type(err).__name__}).'
        return RemoteAccessError(redact(msg + ' Check S3_ENDPOINT_URL and the network.'))
    if isinstance(err, NoCredentialsError):
        return RemoteAccessError(
            f'cannot {action} {remote}: no AWS credentials found; set AWS_ACCESS_KEY_ID and '
            f'AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment. Endpoint: {endpoint}.',
        )
    if isinstance(err, ClientError):
        return _client_error(err, remote, action, endpoint)
    if isinstance(err, BotoCoreError):
        return RemoteAccessError(redact(f'cannot {action} {remote} at {endpoint}: {type(err).__name__}: {err}'))
    return None


def _client_error(err: Any, remote: str, action: str, endpoint: str) -> RemoteAccessError:
    """A ``ClientError`` (the store answered with an error code): denied, missing bucket/object, or other."""
    code = str(err.response.get('Error', {}).get('Code', ''))
    status = str(err.response.get('ResponseMetadata', {}).get('HTTPStatusCode', ''))
    if code in _AUTH_CODES or status == '403':
        return RemoteAccessError(
            f'cannot {action} {remote}: access denied by {endpoint} (error {code or status}). The credentials '
            'from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, values not shown) are wrong '
            'or lack permission for this bucket.',
        )
    if (code in _NOT_FOUND_CODES or status == '404') and action == 'write':
        return RemoteAccessError(
            f'cannot write {remote}: the bucket does not exist at {endpoint} (error {code or status}); '
            'create it first (e.g. `aws s3 mb s3://BUCKET --endpoint-url $S3_ENDPOINT_URL`).',
        )
    if code in _NOT_FOUND_CODES or status == '404':
        return RemoteAccessError(
            f'cannot {action} {remote}: not found at {endpoint} (error {code or status}); check the bucket '
            'and prefix (an MDS dataset needs an index.json, written by `composer-jest convert`).',
        )
    return RemoteAccessError(redact(f'cannot {action} {remote} at {endpoint}: {code or status}: {err}'))


@contextmanager
def remote_errors(remote: str, action: str = 'read', *,
                  keep: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside the block, an object-store failure while using ``remote`` is raised as one :class:`RemoteAccessError`
    (:func:`describe_remote_error`: it names ``remote``, ``action`` and the endpoint, never a credential).

    Other exceptions, a :class:`RemoteAccessError` (already translated) and the ``keep`` types (e.g. errors about
    the input whose chain holds a botocore error) leave the block unchanged.

    Example:
        >>> from botocore.exceptions import EndpointConnectionError
        >>> try:
        ...     with remote_errors('s3://bucket/data', 'list'):
        ...         raise EndpointConnectionError(endpoint_url='http://127.0.0.1:1')
        ... except RemoteAccessError as e:
        ...     print(type(e).__name__, 's3://bucket/data' in str(e))
        RemoteAccessError True
        >>> try:
        ...     with remote_errors('s3://bucket/data', 'list'):
        ...         raise KeyError('not an object-store failure')
        ... except KeyError as e:
        ...     print('unchanged', e)
        unchanged 'not an object-store failure'
    """
    try:
        yield
    except (RemoteAccessError, *keep):
        raise
    except Exception as e:
        err = describe_remote_error(e, remote, action)
        if err is None:
            raise
        raise err from None


def check_s3_prefix(url: str, *, for_write: bool) -> bool:
    """Fail early with one clear error if ``url``'s bucket cannot be used; return whether it holds an MDS index.

    Args:
        url: ``s3://bucket/prefix``.
        for_write: name the action ``write`` (conversion) rather than ``read`` in errors.
    """
    bucket, prefix = split_s3_url(url)
    client = s3_client(max_attempts=2)
    action = 'write' if for_write else 'read'
    with remote_errors(url, action):
        client.head_bucket(Bucket=bucket)
    key = f'{prefix.rstrip("/")}/index.json' if prefix else 'index.json'
    with remote_errors(url, action):
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:
            if _status(e) in _NOT_FOUND_CODES:  # the bucket exists (checked above): no dataset there yet
                return False
            raise


def _status(exc: BaseException) -> str:
    response = getattr(exc, 'response', None) or {}
    return str(response.get('Error', {}).get('Code', '') or response.get('ResponseMetadata', {}).get('HTTPStatusCode'))


def list_s3_objects(url: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Sorted ``s3://`` URLs of the objects under ``url`` (a prefix) whose names end with one of ``suffixes``."""
    bucket, prefix = split_s3_url(url)
    client = s3_client()
    keys = []
    with remote_errors(url, 'list'):
        for page in client.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix):
            keys += [o['Key'] for o in page.get('Contents', [])]
    return [f's3://{bucket}/{k}' for k in sorted(keys) if not suffixes or k.endswith(suffixes)]


def open_s3_object(url: str) -> Any:
    """A readable stream of the object at ``url`` (``botocore`` StreamingBody); errors name the URL."""
    bucket, key = split_s3_url(url)
    with remote_errors(url, 'read'):
        return s3_client().get_object(Bucket=bucket, Key=key)['Body']


def delete_s3_object(url: str) -> None:
    """Delete the object at ``url`` (no error if it is absent)."""
    bucket, key = split_s3_url(url)
    with remote_errors(url, 'write'):
        s3_client().delete_object(Bucket=bucket, Key=key)


# Failures worth another attempt: the endpoint is down, frozen, overloaded or throttling.
_TRANSIENT_CODES = {'500', '502', '503', '504', 'InternalError', 'ServiceUnavailable', 'SlowDown', 'RequestTimeout',
                    'Throttling', 'ThrottlingException', 'RequestTimeTooSkewed'}


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError

    if isinstance(exc, ClientError):
        return _status(exc) in _TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError, OSError))


_CLIENTS: dict[tuple, Any] = {}


def _download_client(timeout: float) -> Any:
    """One client per process, endpoint, credentials and timeout (creating one costs ~1 s; clients are
    thread-safe)."""
    import hashlib

    identity = '\0'.join(os.environ.get(k, '') for k in (*_SECRET_ENV, 'AWS_PROFILE', 'AWS_DEFAULT_REGION'))
    key = (os.getpid(), os.environ.get('S3_ENDPOINT_URL'), timeout, hashlib.sha256(identity.encode()).hexdigest())
    if key not in _CLIENTS:
        _CLIENTS[key] = s3_client(connect_timeout=timeout, read_timeout=timeout, max_attempts=1)
    return _CLIENTS[key]


def download_s3_file(url: str, local: str, *, attempts: int = 6, timeout: float = 30.0,
                     backoff: float = 1.0) -> None:
    """Download ``url`` to ``local`` (atomically: a temporary file renamed into place).

    Each attempt may take at most ``timeout`` seconds to connect and ``timeout`` seconds per read (a
    frozen endpoint fails the attempt). Transient failures are retried up to ``attempts`` times in all,
    sleeping ``backoff * 2**k`` seconds (plus up to 10% jitter) after the k-th failure, with a warning that
    names the object and the endpoint. So a store that comes back within
    ``backoff * (2**(attempts - 1) - 1)`` seconds is waited for; one that does not fails after at most about
    ``attempts * 2 * timeout`` seconds of waiting plus the backoff. Credentials and missing objects fail at once.

    Raises:
        RemoteAccessError: naming ``url``, the endpoint, the number of attempts and the last failure.
    """
    bucket, key = split_s3_url(url)
    start = time.monotonic()
    tmp = f'{local}.tmp{os.getpid()}'
    os.makedirs(os.path.dirname(local) or '.', exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            client = _download_client(timeout)
            body = client.get_object(Bucket=bucket, Key=key)['Body']
            with open(tmp, 'wb') as f:
                for chunk in body.iter_chunks(1 << 20):
                    f.write(chunk)
            os.replace(tmp, local)
            if attempt > 1:
                log.warning('downloaded %s after %d attempts (%.1fs)', url, attempt, time.monotonic() - start)
            return
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not _is_transient(e):  # credentials, a missing object: fail at once, translated
                with remote_errors(url, 'download'):
                    raise
            if attempt == attempts:
                raise RemoteAccessError(redact(
                    f'cannot download {url}: the S3 endpoint {_endpoint()} did not answer in {attempts} attempts over '
                    f'{time.monotonic() - start:.0f}s (timeout {timeout:g}s per connect/read; last failure: '
                    f'{type(e).__name__}: {e}). Check S3_ENDPOINT_URL and the store; raise download_retry / '
                    'download_timeout to wait longer.',
                )) from None
            wait = backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
            log.warning(redact(f'waiting for {url} from the S3 endpoint {_endpoint()}: attempt {attempt}/{attempts} '
                               f'failed ({type(e).__name__}); retrying in {wait:.1f}s'))
            time.sleep(wait)
