"""`veil.keepalive`'s own answer parser: every framing a server may use (Content-Length,
chunked, a body to the close, interim 100 answers), and refusals as the httpx errors callers
handle, against raw servers that answer exactly the bytes given."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from veil.keepalive import KeepAlive


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(rest) < length:
        rest += conn.recv(65536)
    return head + b"\r\n\r\n" + rest


@pytest.fixture
def raw_server() -> Iterator[Callable[[list[bytes], bool], tuple[str, list[bytes]]]]:
    """A server answering each request on one connection with the next of `answers`, then closing
    if `close`; returns its URL and the requests it saw."""
    listeners: list[socket.socket] = []

    def start(answers: list[bytes], close: bool = False) -> tuple[str, list[bytes]]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listeners.append(listener)
        seen: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                for answer in answers:
                    seen.append(_read_request(conn))
                    conn.sendall(answer)
                if not close:
                    conn.recv(1)  # keep it open until the client goes

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}", seen

    yield start
    for listener in listeners:
        listener.close()


def test_content_length_and_chunked_answers_on_one_connection(raw_server):
    url, seen = raw_server(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nT: x\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ]
    )
    pool = KeepAlive(url)
    try:
        first = pool.request("POST", "/a", b"xyz", {"X-Echo": "1"}, timeout=5.0)
        assert first[0] == 200 and first[2] == b"hello" and ("X-A", "1") in first[1]
        assert pool.request("POST", "/b", b"", {}, timeout=5.0)[::2] == (201, b"abcdefg")
        assert pool.request("POST", "/c", b"", {}, timeout=5.0)[::2] == (200, b"ok")
        assert pool.request("POST", "/d", b"", {}, timeout=5.0)[::2] == (204, b"")
    finally:
        pool.close()
    assert len(seen) == 4  # one connection carried all four
    head = seen[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /a HTTP/1.1"
    assert b"Content-Length: 3" in head and b"X-Echo: 1" in head and any(h.startswith(b"Host: ") for h in head)
    assert seen[0].endswith(b"\r\n\r\nxyz")


def test_a_body_without_framing_runs_to_the_close(raw_server):
    url, _ = raw_server([b"HTTP/1.0 200 OK\r\n\r\nall of it"], close=True)
    pool = KeepAlive(url)
    try:
        assert pool.request("POST", "/", b"", {}, timeout=5.0)[2] == b"all of it"
    finally:
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
    ],
)
def test_broken_answers_are_protocol_errors(raw_server, answer):
    url, _ = raw_server([answer], close=True)
    pool = KeepAlive(url)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            pool.request("POST", "/", b"x", {}, timeout=5.0)
    finally:
        pool.close()


def test_header_and_path_injection_is_refused_before_sending():
    pool = KeepAlive("http://127.0.0.1:9")  # never connected: refused before any socket
    with pytest.raises(ValueError, match="invalid header"):
        pool.request("POST", "/", b"", {"X-A": "1\r\nX-B: 2"}, timeout=1.0)
    with pytest.raises(ValueError, match="invalid request path"):
        pool.request("POST", "/ HTTP/1.1\r\nX: y", b"", {}, timeout=1.0)
