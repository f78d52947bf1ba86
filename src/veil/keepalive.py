"""Keep-alive HTTP/1.1 connections to one server, for the calls every request makes: the
platform's `/run` to a runtime instance and the SDK's HE inference to the gateway.

These hops are paid on every request, so their cost matters. httpx spends about a millisecond
of Python per call on loopback (request and response models, h11's state machine, timeout and
pool bookkeeping: measured 1.84 vs 0.65 ms for a 21 KB request and a 41 KB answer through
uvicorn); a reused `TCP_NODELAY` socket with the request written in one `sendall` and the
answer read by a lean HTTP/1.1 parser (`_Conn`: Content-Length, chunked or read-to-close bodies;
`http.client` spent another 0.1-0.2 ms per answer on its `email`-based header parsing) spends
a fraction of that. Failures are raised as the httpx exceptions callers already handle, so
nothing else changes:

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

_MAX_HEAD = 64 << 10  # a response head larger than this is refused (as http.client's line limit)
_NO_BODY = frozenset({204, 304})


class _Conn:
    """One HTTP/1.1 connection: requests written in one `sendall`, answers read with a lean
    parser (status line, header fields, a Content-Length or chunked body, or one read to the
    close). `http.client` parses each answer's header fields with the `email` package, about
    0.1-0.2 ms per call on these hops."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise http.client.RemoteDisconnected("the server closed the connection mid-answer")
        self.buf += chunk

    def _exact(self, n: int) -> bytes:
        """The next `n` bytes of the stream (what is buffered first, then straight from the socket)."""
        if len(self.buf) >= n:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        out = bytearray(n)
        have = len(self.buf)
        out[:have] = self.buf
        self.buf.clear()
        view = memoryview(out)
        while have < n:
            got = self.sock.recv_into(view[have:])
            if not got:
                raise http.client.IncompleteRead(bytes(out[:have]), n - have)
            have += got
        return bytes(out)

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise http.client.LineTooLong("chunk size line")
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _head(self) -> tuple[int, bytes, list[tuple[str, str]]]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise http.client.LineTooLong("response head")
            self._fill()
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise http.client.BadStatusLine(lines[0].decode("latin-1", "replace")[:100])
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or line[:1] in (b" ", b"\t"):
                raise http.client.HTTPException(f"malformed header line {line[:100]!r}")
            headers.append((name.decode("latin-1").strip(), value.strip().decode("latin-1")))
        return int(code), version, headers

    def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailer fields, up to the empty line
                    pass
                return bytes(out)
            out += self._exact(size)
            if self._exact(2) != b"\r\n":
                raise http.client.HTTPException("chunk not followed by CRLF")

    def exchange(self, head: bytes, body: bytes, method: str) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """Send the request; (status, headers, body, whether the connection must close). Raises
        `_Unsent` if the request did not go out whole."""
        try:
            if len(body) <= 65536:
                self.sock.sendall(head + body)
            else:  # a large body is not copied to join the head
                self.sock.sendall(head)
                self.sock.sendall(body)
        except OSError as exc:  # TimeoutError included
            raise _Unsent(exc) from None
        while True:
            status, version, headers = self._head()
            if status >= 200 or status == 101:
                break  # 1xx interim answers (100 Continue) are skipped
        fields = {name.lower(): value for name, value in reversed(headers)}  # the first of a name wins
        connection = fields.get("connection", "").lower()
        close = "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection)
        if method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
            return status, headers, b"", close
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return status, headers, self._chunked(), close
        length = fields.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise http.client.HTTPException(f"bad Content-Length {length[:20]!r}")
            return status, headers, self._exact(int(length)), close
        while True:  # no framing: the body runs to the close
            try:
                self._fill()
            except http.client.RemoteDisconnected:
                data = bytes(self.buf)
                self.buf.clear()
                return status, headers, data, True


class _Unsent(Exception):
    """The request did not go out whole (the connection was already broken)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.timed_out = isinstance(exc, TimeoutError)


def _closed_by_peer(conn: _Conn) -> bool:
    """An idle connection with something to read: the peer closed it (or broke the protocol)."""
    if conn.buf:
        return True
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
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
        self._idle: list[tuple[float, _Conn]] = []
        default_port = 443 if self.https else 80
        self._host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self._closed = False

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                since, conn = self._idle.pop()
                if now - since < self.idle_expiry_s and not _closed_by_peer(conn):
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: _Conn) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.keep:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()

    def _open(self, connect_timeout: float) -> _Conn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {self.host}:{self.port} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            except TimeoutError:
                sock.close()
                raise httpx.ConnectTimeout(f"no TLS session with {self.host}:{self.port} in time") from None
            except OSError as exc:
                sock.close()
                raise httpx.ConnectError(f"TLS with {self.host}:{self.port} failed: {exc}") from None
        return _Conn(sock)

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """The request line and header block (Host and Content-Length added unless given)."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1"]
        given = set()
        for name, value in headers.items():
            text = f"{name}{value}"
            if "\r" in text or "\n" in text or ":" in name:
                raise ValueError(f"invalid header {name!r}")
            given.add(name.lower())
            lines.append(f"{name}: {value}")
        if "host" not in given:
            lines.append(f"Host: {self._host_header}")
        if "content-length" not in given:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

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
        if " " in path or "\r" in path or "\n" in path:
            raise ValueError(f"invalid request path {path[:100]!r}")
        head = self._head(method, path, body, headers)
        conn = self._take() or self._open(min(timeout, connect_timeout if connect_timeout is not None else timeout))
        conn.sock.settimeout(max(timeout, 0.001))  # 0 would make the socket non-blocking
        try:
            status, answer_headers, data, close = conn.exchange(head, body, method)
        except _Unsent as exc:
            conn.close()
            if exc.timed_out:
                raise httpx.WriteTimeout("the request could not be sent in time") from None
            raise httpx.WriteError(str(exc)) from None
        except TimeoutError:
            conn.close()
            raise httpx.ReadTimeout("no answer in time") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
        if close:
            conn.close()
        else:
            self._give_back(conn)
        return status, answer_headers, data

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, conn in idle:
            with contextlib.suppress(OSError):
                conn.close()
