"""Fixtures of the storage tests: an S3-compatible server (moto) on 127.0.0.1 and store
locations for every protocol (documents come from store_helpers.make_doc).

The moto server is started once per session, on demand (only if an s3 test runs), and stopped
by its pid at the end. AWS credentials are dummies set here only; no traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.storage_adapters.store_helpers import BUCKET, Location


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session; yields its storage options."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            options = {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "key": "testing",
                "secret": "testing",
            }
            yield options
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _location(protocol: str, request, tmp_path) -> Location:
    name = uuid.uuid4().hex[:12]
    if protocol == "file":
        return Location("file", f"file://{tmp_path}/store-{name}")
    if protocol == "memory":
        url = f"memory://store-{name}"
        request.addfinalizer(lambda: _clear_memory(url))
        return Location("memory", url)
    options = request.getfixturevalue("s3_server")
    import s3fs

    # a bucket per test: moto's listings scan the whole bucket
    s3fs.S3FileSystem(**options).mkdir(f"{BUCKET}-{name}")
    return Location("s3", f"s3://{BUCKET}-{name}/store", dict(options))


def _clear_memory(url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["file", "memory", "s3"])
def location(request, tmp_path) -> Location:
    """A fresh, empty store location on each protocol."""
    return _location(request.param, request, tmp_path)


@pytest.fixture(params=["file", "s3"])
def shared_location(request, tmp_path) -> Location:
    """A fresh store location that other processes can reach too (no memory://)."""
    return _location(request.param, request, tmp_path)
