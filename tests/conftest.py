"""Shared fixtures: the repository root and a real KeyService on loopback.

`keyservice_server` runs the real FastAPI app under uvicorn in a thread, with a real SQLite
database in a temporary state dir and simulated attestation allowed, so tests exercise the
same HTTP, authentication and storage code as production.
"""

from __future__ import annotations

import functools
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root directory (holds src/, docs/, bench/)."""
    return REPO_ROOT


@functools.cache
def runtime_measurement() -> str:
    """The runtime's measurement, taken once per test session so concurrent edits cannot skew it."""
    from veil.attest.measurement import measure

    return measure("runtime")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def veil_command() -> list[str]:
    """argv prefix running the `veil` CLI with the interpreter running the tests."""
    return [sys.executable, "-m", "veil.cli"]


class UvicornThread:
    """An ASGI app served by uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class KeyServiceHandle:
    """A running KeyService and what a test needs to talk to it."""

    url: str
    state_dir: Path
    service: object  # veil.keyservice.service.KeyService
    server: UvicornThread
    clients: list = field(default_factory=list)

    @property
    def sim_root(self):  # -> veil.attest.sim.SimRoot
        from veil.attest.sim import SimRoot
        from veil.keyservice.server import sim_root_path

        return SimRoot.load_or_create(sim_root_path(self.state_dir))

    def trust(self):  # -> veil.attest.verify.TrustConfig
        from veil.attest.verify import TrustConfig

        return TrustConfig(sim_roots=[self.sim_root.public_key])

    def principal(self, identity=None, *, register: bool = True):  # -> PrincipalClient
        """A PrincipalClient (new identity unless given) that verified and pinned the KeyService."""
        from veil.attest.measurement import measure
        from veil.crypto.identity import Identity
        from veil.keyservice.client import PrincipalClient

        client = PrincipalClient(
            self.url,
            identity or Identity.generate(),
            expected_measurements={measure("keyservice")},
            trust=self.trust(),
            allow_simulated=True,
        )
        self.clients.append(client)
        client.connect()
        if register:
            client.register()
        return client

    def runtime(self, measurement: str | None = None, *, debug: bool = False):  # -> RuntimeKeyClient
        """A RuntimeKeyClient whose simulated evidence carries `measurement` (default: the real runtime's)."""
        from veil.attest.sim import SimProvider
        from veil.keyservice.client import RuntimeKeyClient

        provider = SimProvider(self.sim_root, measurement or runtime_measurement(), debug=debug)
        client = RuntimeKeyClient(self.url, provider)
        self.clients.append(client)
        return client

    def http(self) -> httpx.Client:
        """A raw HTTP client for hand-made (malformed, forged, replayed) requests."""
        client = httpx.Client(base_url=self.url, timeout=10)
        self.clients.append(client)
        return client


def start_keyservice(state_dir: Path, *, allow_simulated: bool = True) -> KeyServiceHandle:
    """Build a KeyService on `state_dir` and serve it in a thread (caller stops it)."""
    from veil.keyservice.api import create_app
    from veil.keyservice.server import build_keyservice

    ks = build_keyservice(state_dir, allow_simulated=allow_simulated)
    server = UvicornThread(create_app(ks))
    server.start()
    return KeyServiceHandle(server.url, Path(state_dir), ks, server)


def stop_keyservice(handle: KeyServiceHandle) -> None:
    for client in handle.clients:
        client.close()
    handle.server.stop()
    handle.service.store.close()


@pytest.fixture
def keyservice_server(tmp_path: Path) -> Iterator[KeyServiceHandle]:
    """A fresh KeyService (simulation allowed) on loopback with its state in tmp_path/keyservice."""
    handle = start_keyservice(tmp_path / "keyservice")
    try:
        yield handle
    finally:
        stop_keyservice(handle)


@pytest.fixture
def keyservice_factory() -> Iterator:
    """`start(state_dir, allow_simulated=True) -> KeyServiceHandle`; `.stop(handle)` early (e.g. to restart).

    Everything started is stopped at teardown, so restart tests need no cleanup of their own.
    """
    started: list[KeyServiceHandle] = []

    class Factory:
        @staticmethod
        def start(state_dir: Path, *, allow_simulated: bool = True) -> KeyServiceHandle:
            handle = start_keyservice(state_dir, allow_simulated=allow_simulated)
            started.append(handle)
            return handle

        @staticmethod
        def stop(handle: KeyServiceHandle) -> None:
            if handle in started:
                started.remove(handle)
                stop_keyservice(handle)

    yield Factory
    for handle in started:
        stop_keyservice(handle)


@pytest.fixture
def veil_cli() -> list[str]:
    """argv prefix of the `veil` command (`python -m veil.cli`), for real-process tests."""
    return veil_command()


@pytest.fixture
def serve_app() -> Iterator:
    """`serve_app(asgi_app) -> url`: serve any ASGI app on loopback for the test's duration."""
    servers: list[UvicornThread] = []

    def start(app: object) -> str:
        server = UvicornThread(app)
        server.start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback TCP port that was free when the test started."""
    return free_port()
