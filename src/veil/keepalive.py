"""Keep-alive HTTP/1.1 connections to one server, for the calls every request makes: the
platform's `/run` to a runtime instance and the SDK's HE inference to the gateway.

These hops are paid on every request, so their cost matters. httpx spends about a millisecond
of Python per call on loopback (request and response models, h11's state machine, timeout and
pool bookkeeping: measured 1.84 vs 0.65 ms for a 21 KB request and a 41 KB answer through
uvicorn); `http.client` on a reused `TCP_NODELAY` socket spends a fraction of that. Failures
are raised as the httpx exceptions callers already handle, so nothing else changes:

- no connection or no answer in time: `httpx.ConnectTimeout`, `httpx.WriteTimeout`,
  `httpx.ReadTimeout` (all `httpx.TimeoutException`);
- any other transport failure: `httpx.ConnectError` (nothing was sent), `httpx.WriteError`
  (the request did not go out whole) or `httpx.RemoteProtocolError` (sent, no whole answer),
  all `httpx.TransportError`.

An idle connection is reused only if the peer has not closed it (checked without blocking, as
httpcore does) and it has been idle less than `idle_expiry_s`, shorter than a server's own
keep-alive (uvicorn: 5 s), so a connection the server is closing is rarely picked.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

import httpx


class _Plain(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Tls(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle connection with something to read: the peer closed it (or broke the protocol)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class KeepAlive:
    """Connections to `base_url` (http or https), thread-safe: each call takes an idle
    connection or opens one, and gives it back after a complete answer; at most `keep` idle."""

    def __init__(
        self, base_url: str, *, keep: int = 4, idle_expiry_s: float = 4.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.keep = max(1, keep)
        self.idle_expiry_s = idle_expiry_s
        self._ssl = (ssl_context or httpx.create_ssl_context()) if self.https else None
        self._lock = threading.Lock()
        self._idle: list[tuple[float, http.client.HTTPConnection]] = []
        self._closed = False

    def _take(self) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                since, conn = self._idle.pop()
                if now - since < self.idle_expiry_s and not _closed_by_peer(conn):
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()

    def _open(self, connect_timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.https:
            conn = _Tls(self.host, self.port, timeout=connect_timeout, context=self._ssl)
        else:
            conn = _Plain(self.host, self.port, timeout=connect_timeout)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise httpx.ConnectTimeout(f"no connection to {self.host}:{self.port} in time") from None
        except OSError as exc:
            conn.close()
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        *,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request; (status, response headers, response body). `timeout` bounds each
        wait for the network (as httpx's read and write timeouts do)."""
        conn = self._take() or self._open(min(timeout, connect_timeout if connect_timeout is not None else timeout))
        assert conn.sock is not None
        conn.sock.settimeout(max(timeout, 0.001))  # 0 would make the socket non-blocking
        sent = False
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            sent = True
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            conn.close()
            if not sent:
                raise httpx.WriteTimeout("the request could not be sent in time") from None
            raise httpx.ReadTimeout("no answer in time") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            kind = httpx.RemoteProtocolError if sent else httpx.WriteError
            raise kind(f"{type(exc).__name__}: {exc}") from None
        if resp.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return resp.status, resp.getheaders(), data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, conn in idle:
            with contextlib.suppress(OSError):
                conn.close()
