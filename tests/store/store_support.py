"""Helpers of the model-store tests: ports, waiting for a service, and a TCP proxy on loopback
that really cuts connections (resumed range reads are exercised over a real broken stream)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: exited with {proc.returncode}: {log.read_text()[-2000:]}"
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {timeout} s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class CuttingProxy:
    """A loopback TCP proxy to `target` that closes the first `cuts` connections after passing
    `after` bytes of the server's answer, and records what each request asked for."""

    target: tuple[str, int]
    after: int
    cuts: int
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None

    def start(self) -> CuttingProxy:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            cut = self.cuts > 0
            self.cuts -= 1 if cut else 0
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection(self.target, timeout=10)
        client.settimeout(10)
        head = client.recv(65536)
        self.requests.append(head)
        upstream.sendall(head)
        sent = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if cut and sent + len(data) > self.after:
                    client.sendall(data[: max(0, self.after - sent)])
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
