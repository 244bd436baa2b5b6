"""A local S3 endpoint for the demo and the tests: a moto server on 127.0.0.1.

It speaks real S3 over HTTP, so everything above it (pyarrow's S3 filesystem, s3fs, Ray Data,
Ray Train storage) runs exactly as against AWS or MinIO. Buckets are created with boto3
(s3fs ``mkdir`` does not create buckets on moto).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Iterator

from contextlib import contextmanager

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local-demo-key-id",
    "AWS_SECRET_ACCESS_KEY": "local-demo-secret-key",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3_endpoint(port: int | None = None, set_env: bool = True) -> Iterator[str]:
    """Start ``moto.server`` on a loopback port; yield its URL; stop it on exit.

    With ``set_env`` the standard AWS variables point at it for this process and the Ray workers
    it starts (the previous values are restored afterwards).
    """
    try:
        import moto  # noqa: F401
    except ImportError as exc:  # pragma: no cover - installed with the [test] extra
        raise RuntimeError("the local S3 endpoint needs moto[server]: pip install 'moto[server]'") from exc
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}")
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", *TEST_CREDENTIALS)}
    if set_env:
        os.environ.update({"AWS_ENDPOINT_URL": url, **TEST_CREDENTIALS})
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def create_bucket(endpoint_url: str, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
