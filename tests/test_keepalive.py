"""`veil.keepalive`: connections are reused, a connection the server closed is never used again,
and failures come out as the httpx exceptions the platform and the SDK already handle."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from veil.keepalive import KeepAlive


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/slow":
            time.sleep(0.5)
        answer = f"{self.client_address[1]}:{len(body)}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("X-Echo", self.headers.get("X-Echo", ""))
        self.end_headers()
        self.wfile.write(answer)
        if self.path == "/close":  # answers, then closes without saying so (a runtime after an error)
            self.close_connection = True


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def test_reuses_one_connection_and_passes_headers(server):
    pool = KeepAlive(_url(server), keep=2)
    try:
        answers = [pool.request("POST", "/x", b"abc", {"X-Echo": "hi"}, timeout=5.0) for _ in range(5)]
    finally:
        pool.close()
    ports = {body.split(b":")[0] for _, _, body in answers}
    assert len(ports) == 1  # one client port: the same connection every time
    status, headers, body = answers[0]
    assert status == 200 and body.endswith(b":3") and ("X-Echo", "hi") in headers


def test_a_connection_the_server_closed_is_not_reused(server):
    pool = KeepAlive(_url(server), keep=2)
    try:
        first = pool.request("POST", "/close", b"", {}, timeout=5.0)[2]
        time.sleep(0.1)  # the server's FIN arrives
        second = pool.request("POST", "/x", b"", {}, timeout=5.0)[2]
    finally:
        pool.close()
    assert first.split(b":")[0] != second.split(b":")[0]


def test_idle_connections_expire():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    pool = KeepAlive(_url(srv), keep=2, idle_expiry_s=0.05)
    try:
        first = pool.request("POST", "/x", b"", {}, timeout=5.0)[2]
        time.sleep(0.1)
        second = pool.request("POST", "/x", b"", {}, timeout=5.0)[2]
    finally:
        pool.close()
        srv.shutdown()
        srv.server_close()
    assert first.split(b":")[0] != second.split(b":")[0]


def test_no_answer_in_time_is_a_read_timeout(server):
    pool = KeepAlive(_url(server))
    try:
        with pytest.raises(httpx.ReadTimeout):
            pool.request("POST", "/slow", b"", {}, timeout=0.1)
        assert pool.request("POST", "/x", b"", {}, timeout=5.0)[0] == 200  # a fresh connection after it
    finally:
        pool.close()


def test_refused_is_a_connect_error_and_a_dropped_answer_a_protocol_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        KeepAlive(f"http://127.0.0.1:{port}").request("POST", "/", b"", {}, timeout=1.0)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()  # read the request, answer nothing

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            KeepAlive(f"http://127.0.0.1:{listener.getsockname()[1]}").request("POST", "/", b"x", {}, timeout=5.0)
    finally:
        thread.join(5)
        listener.close()


def test_only_http_urls():
    with pytest.raises(ValueError, match="not an http"):
        KeepAlive("ftp://example.org")
