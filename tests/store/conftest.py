"""Fixtures of the model-store tests: a real `veil store serve` subprocess, a real S3-compatible
server (moto's standalone server) on loopback, sealed files, and a TCP proxy that really cuts
connections (to exercise resumed range reads without mocking the network)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from store_support import free_port, stop, wait_healthy

from veil.crypto import chunked
from veil.crypto.keys import SymmetricKey

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "veil-test",
    "AWS_SECRET_ACCESS_KEY": "veil-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Sealed:
    model: str
    version: int
    key: SymmetricKey
    plaintext: bytes
    data: bytes


@pytest.fixture
def seal() -> Callable[..., Sealed]:
    """`seal(model, version, size=..., chunk_size=...)`: a real sealed model file of random bytes."""

    def make(model: str = "m", version: int = 1, size: int = 50_000, chunk_size: int = 1 << 16) -> Sealed:
        key = SymmetricKey.generate()
        plaintext = os.urandom(size)
        data = chunked.seal_bytes(key, plaintext, model=model, version=version, chunk_size=chunk_size)
        return Sealed(model, version, key, plaintext, data)

    return make


@dataclass
class StoreService:
    url: str
    root: Path
    token: str
    proc: subprocess.Popen
    log: Path


@pytest.fixture
def start_store_service(tmp_path: Path) -> Iterator[Callable[..., StoreService]]:
    """`start(*args, root=None, max_bytes=None, token=True)`: `veil store serve` as a subprocess."""
    started: list[StoreService] = []

    def start(
        *extra: str, root: Path | None = None, max_bytes: int | None = None, env: dict | None = None, token: bool = True
    ) -> StoreService:
        n = len(started)
        root = root or tmp_path / f"store{n}"
        token_file = tmp_path / f"token{n}"
        secret = secrets.token_urlsafe(24)
        token_file.write_text(secret + "\n")
        port = free_port()
        log = tmp_path / f"store{n}.log"
        argv = [sys.executable, "-m", "veil.cli", "store", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if not extra:
            argv += ["--root", str(root), "--create"]
        argv += list(extra)
        if token:
            argv += ["--write-token-file", str(token_file)]
        if max_bytes is not None:
            argv += ["--max-bytes", str(max_bytes)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
            )
        s = StoreService(f"http://127.0.0.1:{port}", root, secret, proc, log)
        started.append(s)
        wait_healthy(f"{s.url}/healthz", proc, log)
        return s

    yield start
    for s in started:
        stop(s.proc)


@pytest.fixture
def store_service(start_store_service: Callable[..., StoreService]) -> StoreService:
    return start_store_service()


@dataclass
class S3Server:
    endpoint_url: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3-compatible server on loopback (a real HTTP server, speaking S3)."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **S3_ENV},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/moto-api/", proc, log)
        yield S3Server(url, proc)
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's AWS settings pointed at the loopback S3 server (never at AWS)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
