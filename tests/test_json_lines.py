"""The fork template's framing (`veil.wire.lines`), on a real socket pair."""

from __future__ import annotations

import socket

import pytest

from veil.wire.lines import read_json_line, send_json_line


def test_one_line_each_way_and_what_follows_is_kept() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_json_line(a, {"pid": 42})
        a.sendall(b"exit 0\n")
        message, rest = read_json_line(b, 1024)
        assert message == {"pid": 42}
        # one recv may carry the next line; it is returned, not lost
        assert rest in (b"", b"exit 0\n")


def test_a_peer_that_closes_without_a_line_reads_as_empty() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        assert read_json_line(b, 1024) == ({}, b"")


def test_a_line_past_the_limit_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 5000)
        with pytest.raises(ValueError, match="exceeds 1024 bytes"):
            read_json_line(b, 1024)


def test_a_line_that_is_not_json_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"not json\n")
        with pytest.raises(ValueError):
            read_json_line(b, 1024)
