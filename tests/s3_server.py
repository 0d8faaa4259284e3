"""A real S3 API on 127.0.0.1 for the tests: moto in server mode, in its own process, started and stopped here.

Not a mock of the client: the pipeline talks HTTP to it through obstore exactly as to AWS, MinIO or Ceph. The
port is chosen when the test session starts (`configure_environment`, from conftest's `pytest_configure`) and
written into the standard AWS variables, so every process the tests start - Dask workers, the local Ray and
its workers, `genesis` subprocesses - inherits the endpoint and the (dummy) keys.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

__all__ = ["S3Server", "configure_environment", "new_bucket"]

KEYS = {"AWS_ACCESS_KEY_ID": "genesis-test", "AWS_SECRET_ACCESS_KEY": "genesis-test-secret",
        "AWS_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_environment() -> str:
    """Point the AWS variables at this session's server (not started yet); the endpoint URL."""
    endpoint = f"http://127.0.0.1:{_free_port()}"
    os.environ["GENESIS_TEST_S3_ENDPOINT"] = endpoint
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for k, v in KEYS.items():
        os.environ[k] = v
    os.environ.pop("AWS_PROFILE", None)
    return endpoint


def _die_with_parent() -> None:
    """In the server's process before exec: the kernel sends it SIGTERM when the test process dies, even of a
    SIGKILL, so no server outlives its session (Linux; elsewhere `stop()` is all there is)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class S3Server:
    """moto's S3 server on the session's endpoint; `stop()` ends exactly the process it started."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        port = int(endpoint.rsplit(":", 1)[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {endpoint}")
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
            "region_name": KEYS["AWS_REGION"]})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def new_bucket(server: S3Server, stem: str = "genesis") -> str:
    """A fresh, empty bucket; its name."""
    name = f"{stem}-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=name)
    return name
