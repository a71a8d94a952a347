"""Shared fixtures: real servers on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "k8s" / "schemas"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """moto's S3 server as a real process on loopback."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class FlakyProxy:
    """A TCP proxy in front of a server; `down()` cuts every connection and refuses new ones.

    Lets a test take the object store away mid-operation and bring it back, without losing the
    store's contents (moto keeps its state in memory). `delay_s` > 0 makes it a slow link (that
    many seconds per 64 KiB forwarded); `requests` holds the first line of each HTTP request seen.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.delay_s = 0.0
        self.requests: list[str] = []

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the accept() blocked in the proxy thread; close alone does not
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, upload in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upload), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while data := src.recv(65536):
                if upload and data[:8].split(b" ", 1)[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"):
                    self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                if self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket on the real moto S3 server; AWS_* env points at it (also for subprocesses).

    Yields the bucket's URI, e.g. s3://test-1a2b3c4d.
    """
    import boto3
    import fsspec

    for key, value in _s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server.endpoint).create_bucket(Bucket=bucket)
    fsspec.filesystem("s3").clear_instance_cache()
    yield f"s3://{bucket}"


@pytest.fixture
def flaky_s3(moto_server, monkeypatch):
    """Like `s3`, but through a proxy the test can take down and bring back: yields (bucket, proxy)."""
    import boto3
    import fsspec

    proxy = FlakyProxy(moto_server.port)
    proxy.up()
    for key, value in _s3_env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLIPFORGE_STORAGE_BACKOFF_S", "0.05")
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server.endpoint).create_bucket(Bucket=bucket)
    fsspec.filesystem("s3").clear_instance_cache()
    yield f"s3://{bucket}", proxy
    proxy.down()


@pytest.fixture(scope="session")
def schemas_dir() -> Path:
    """The CRD schemas vendored in k8s/schemas (see its README for where they come from)."""
    assert SCHEMAS.is_dir(), f"{SCHEMAS} is missing"
    return SCHEMAS


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running clipforge subprocesses: the repo importable, quiet tokenizers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env["CLIPFORGE_STORAGE_BACKOFF_S"] = env.get("CLIPFORGE_STORAGE_BACKOFF_S", "0.05")
    return env


def which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    assert path, f"{tool} is not installed: `make test` installs it (see the Makefile)"
    return path
