"""A real HTTP S3 endpoint for tests: moto's S3 server (``moto[server]``) in its own process on 127.0.0.1.

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
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

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


# The server binds port 0 itself (no window between choosing a free port and binding it, where another process
# of a parallel test could take it) and prints the port it got.
_SERVE = (
    'import sys, threading\n'
    'from moto.server import ThreadedMotoServer\n'
    "server = ThreadedMotoServer('127.0.0.1', 0, verbose=False)\n"
    'server.start()\n'
    'print(server.get_host_and_port()[1], flush=True)\n'
    "sys.stdout = open('/dev/null', 'w')\n"
    'threading.Event().wait()\n'
)


def start_moto_server(timeout: float = 120.0) -> MotoServer:
    """Start a moto S3 server on a port it binds itself (port 0) with auth on; make credentials.

    The process prints its port once it listens; ``timeout`` bounds only the wait for that line (a broken
    install fails with the server's output instead of hanging).
    """
    import boto3

    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT='3')  # 3 unauthenticated IAM calls, then auth enforced
    log = tempfile.TemporaryFile()  # the request log (a pipe nobody reads would fill up and block the server)
    process = subprocess.Popen([sys.executable, '-c', _SERVE], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    ready = queue.Queue()
    threading.Thread(target=lambda: ready.put(process.stdout.readline()), daemon=True).start()
    try:
        line = ready.get(timeout=timeout)
    except queue.Empty:
        line = ''
    if not line.strip().isdigit():
        process.kill()
        process.wait(timeout=10)
        log.seek(0)
        err = log.read()[-2000:].decode(errors='replace')
        raise RuntimeError(f'the moto S3 server did not start (exit code {process.poll()}): {err}')
    url = f'http://127.0.0.1:{int(line)}'
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


_NOT_LISTENING: list[socket.socket] = []


def unreachable_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: a port held bound (never listening) for the whole session, so no
    other process can take it; connecting to it is refused at once."""
    if not _NOT_LISTENING:
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))
        _NOT_LISTENING.append(sock)
    return f'http://127.0.0.1:{_NOT_LISTENING[0].getsockname()[1]}'
