"""A real HTTP S3 endpoint for tests: ``moto_server`` (from ``moto[server]``) on 127.0.0.1.

The server enforces credentials (IAM auth on, like a real object store): the first three actions create
an IAM user with an S3 policy and an access key, which the fixtures then export as the environment's
credentials. Wrong credentials are therefore rejected, as they would be by S3.

Use in a test module::

    from s3_server import moto_server, s3_endpoint  # noqa: F401  (pytest fixtures)

    def test_something(s3_endpoint):
        s3_endpoint.url, s3_endpoint.bucket  # env: AWS_* and S3_ENDPOINT_URL set for this test
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ['MotoServer', 'S3Endpoint', 'start_moto_server', 'moto_server', 's3_endpoint', 'streaming_shm']

REGION = 'us-east-1'


@dataclass
class MotoServer:
    """A running ``moto_server`` process and the credentials it accepts."""

    url: str
    pid: int
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def stop(self) -> None:
        """Stop the server by its pid."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        return {'AWS_ACCESS_KEY_ID': self.access_key, 'AWS_SECRET_ACCESS_KEY': self.secret_key,
                'AWS_DEFAULT_REGION': REGION, 'S3_ENDPOINT_URL': self.url}


@dataclass
class S3Endpoint:
    """What a test gets: the endpoint URL and a fresh, empty bucket (env already points at them)."""

    url: str
    bucket: str
    server: MotoServer

    def client(self):
        import boto3

        return boto3.session.Session().client('s3', endpoint_url=self.url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _moto_executable() -> str:
    # The venv's console script sits next to the interpreter even when the venv is not activated.
    candidate = Path(sys.executable).parent / 'moto_server'
    return str(candidate) if candidate.exists() else (shutil.which('moto_server') or 'moto_server')


def start_moto_server(timeout: float = 30.0) -> MotoServer:
    """Start ``moto_server -H 127.0.0.1 -p <free port>`` with auth on, wait until it answers, make credentials."""
    import boto3

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT='3')  # 3 unauthenticated IAM calls, then auth enforced
    process = subprocess.Popen([_moto_executable(), '-H', '127.0.0.1', '-p', str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f'{url}/moto-api/', timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f'moto_server did not start on {url} (exit code {process.poll()})') from None
            time.sleep(0.1)
    try:
        iam = boto3.session.Session().client('iam', endpoint_url=url, region_name=REGION,
                                             aws_access_key_id='bootstrap', aws_secret_access_key='bootstrap')
        iam.create_user(UserName='composer-jest-tests')
        iam.put_user_policy(UserName='composer-jest-tests', PolicyName='s3-all', PolicyDocument=json.dumps({
            'Version': '2012-10-17',
            'Statement': [{'Effect': 'Allow', 'Action': 's3:*', 'Resource': '*'}],
        }))
        key = iam.create_access_key(UserName='composer-jest-tests')['AccessKey']
    except Exception:
        process.kill()
        raise
    return MotoServer(url=url, pid=process.pid, access_key=key['AccessKeyId'], secret_key=key['SecretAccessKey'],
                      process=process)


@pytest.fixture(scope='session')
def streaming_shm() -> None:
    """Clear shared memory left by crashed streaming runs, once per session."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()


@pytest.fixture(scope='session')
def moto_server(streaming_shm) -> Iterator[MotoServer]:
    """One moto S3 server for the session, stopped by pid at teardown."""
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """Env pointing at the session server (credentials, region, ``S3_ENDPOINT_URL``) and a new bucket."""
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ('AWS_SESSION_TOKEN', 'AWS_PROFILE'):
        monkeypatch.delenv(name, raising=False)
    endpoint = S3Endpoint(url=moto_server.url, bucket=f'jest-{uuid.uuid4().hex[:12]}', server=moto_server)
    endpoint.client().create_bucket(Bucket=endpoint.bucket)
    yield endpoint


def unreachable_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    return f'http://127.0.0.1:{_free_port()}'

