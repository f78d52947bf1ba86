"""The action server's own request-head parser (`read_head_fields`): the same answers as
`http.server` for what it accepts, clear refusals (never a hang or a traceback) for heads it does
not, and keep-alive as HTTP/1.0 and 1.1 define it."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from runtime_support import action_server

from veil.runtime.action_server import (
    MAX_HEADERS,
    HeadError,
    read_head_fields,
)


class Echo:
    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        return {"got": value}


@pytest.fixture
def port() -> Iterator[int]:
    with action_server(Echo(), threads=2, queue=2) as p:
        yield p


def _exchange(port: int, raw: bytes, *, answers: int = 1) -> list[tuple[str, dict[str, str], bytes]]:
    """Send `raw` on one connection; read `answers` answers (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        stream = sock.makefile("rb")
        out = []
        for _ in range(answers):
            status = stream.readline().decode().strip()
            headers: dict[str, str] = {}
            while (line := stream.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = stream.read(int(headers.get("content-length", "0")))
            out.append((status, headers, body))
        return out


def _run(body: bytes, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    head = f"POST /run {version}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


def test_a_run_is_answered_and_the_connection_kept_for_the_next(port):
    body = json.dumps({"value": {"x": 1}}).encode()
    answers = _exchange(port, _run(body) + _run(body), answers=2)
    for status, headers, content in answers:
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"] == "application/json" and "connection" not in headers
        assert json.loads(content) == {"got": {"x": 1}}


def test_header_names_are_case_insensitive(port):
    body = json.dumps({"value": {"y": 2}}).encode()
    raw = f"POST /run HTTP/1.1\r\nhOST: x\r\ncontent-LENGTH: {len(body)}\r\n\r\n".encode() + body
    ((status, _, content),) = _exchange(port, raw)
    assert status.endswith("200 OK") and json.loads(content) == {"got": {"y": 2}}


def test_http_1_0_closes_unless_asked_to_keep_alive(port):
    body = json.dumps({"value": {}}).encode()
    ((_, closing, _),) = _exchange(port, _run(body, version="HTTP/1.0"))
    assert closing["connection"] == "close"
    answers = _exchange(port, _run(body, "Connection: keep-alive\r\n", "HTTP/1.0") * 2, answers=2)
    assert all(h.get("connection") is None for _, h, _ in answers)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (" folded: continuation\r\n", "400"),
        ("no colon here\r\n", "400"),
        ("Content-Length: 999\r\n", "400"),  # a second, conflicting length: smuggling refused
        ("".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADERS)), "431"),
        ("X-Long: " + "a" * 70_000 + "\r\n", "431"),
    ],
)
def test_bad_heads_are_refused_with_a_status_and_the_connection_closed(port, extra, status):
    body = json.dumps({"value": {}}).encode()
    ((line, headers, _),) = _exchange(port, _run(body, extra))
    assert line.split()[1] == status
    assert headers.get("connection") == "close"


def _raw_answer(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return b"".join(iter(lambda: sock.recv(65536), b""))  # to the close


def test_other_request_lines_go_to_http_server(port):
    # http.server's own refusals (as HTTP/0.9: it never learnt a version it accepts), then the close
    assert b"Error code: 505" in _raw_answer(port, b"POST /run HTTP/2.0\r\n\r\n")
    assert b"Error code: 400" in _raw_answer(port, b"GARBAGE\r\n\r\n")


def test_read_head_fields_keeps_the_first_of_a_name_and_stops_at_the_blank_line():
    fields = read_head_fields(io.BytesIO(b"A: 1\r\nb:  two \r\na: 3\r\n\r\nbody"))
    assert fields.get("a") == "1" and fields["B"] == "two" and "content-length" not in fields
    with pytest.raises(HeadError, match="conflicting"):
        read_head_fields(io.BytesIO(b"Content-Length: 1\r\ncontent-length: 2\r\n\r\n"))
    same = read_head_fields(io.BytesIO(b"Content-Length: 1\r\ncontent-length: 1\r\n\r\n"))
    assert same.get("Content-Length") == "1"
