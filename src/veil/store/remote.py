"""Reading sealed models from `veil store serve` over HTTP: the runtime's side of the network store.

Standard library only (`http.client`), like the runtime's KeyService client: this module is part
of the runtime's measured code and its import time is part of every cold start.

`open` is one streamed GET: the runtime decrypts chunk by chunk as bytes arrive and never holds the
sealed file whole. If the connection breaks mid-file the reader resumes where it stopped with a
range request (`Range: bytes=N-`) bound to the same file (`If-Match: <etag>`), a few times at most,
so a flaky network costs a retry, not a cold start, and a file replaced meanwhile is refused rather
than spliced.

Wire protocol (v1; the service is `veil.store.server`):

    GET  /v1/store                                  {"v": 1, "service": "veil-store", ...}
    GET  /v1/models/{model}/versions                {"v": 1, "model", "versions": [1, 2]}
    HEAD /v1/models/{model}/versions/{version}      Content-Length, ETag
    GET  /v1/models/{model}/versions/{version}      the sealed bytes; Range: bytes=a-b | a- | -n
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from typing import Any

from veil.crypto.fields import check_identifier
from veil.errors import NotFound, Unavailable, VeilError
from veil.store.base import BlobInfo, check_version
from veil.store.stream import ResumableBlob

SERVICE = "veil-store"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def error_from_response(status: int, raw: bytes, where: str) -> VeilError:
    """The VeilError a store answer stands for (its own `{"error": {"code", "message"}}` kept)."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code, message = err.get("code"), err.get("message")
    if status == 404:
        return NotFound(str(message or f"{where}: not in the model store"), code=str(code or "unknown_model"))
    if status >= 500:
        return Unavailable(
            f"model store failed on {where}: HTTP {status}" + (f" ({code}: {message})" if code else ""),
            code="store_unavailable",
        )
    return VeilError(
        str(message or f"model store refused {where}: HTTP {status}"), code=str(code or "store_error"), status=status
    )


class HttpModelReader:
    """The sealed models of a `veil store serve` at `url` (`http://host:port[/prefix]`; https too).

    The constructor asks the service who it is, so a runtime pointed at nothing (or at something
    that is not a Veil store) fails at `/init` with `no_store`, not later with `unknown_model`.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, resumes: int = 3, check: bool = True) -> None:
        self.url = url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"model store URL must be http(s)://host[:port][/prefix], got {url!r}")
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self.resumes = resumes
        if check:
            self.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- plumbing ----------------------------------------------------------------------------
    def connection(self) -> http.client.HTTPConnection:
        """A new connection (model reads are rare and long; one connection each keeps them apart)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def blob_path(self, model_id: str, version: int) -> str:
        return f"{self._prefix}/v1/models/{check_identifier(model_id, 'model')}/versions/{check_version(version)}"

    def unreachable(self, exc: BaseException, *, code: str = "store_unavailable") -> Unavailable:
        return Unavailable(f"model store at {self.url} unreachable: {type(exc).__name__}", code=code)

    def exchange(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request on its own connection."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, resp.headers, raw
        except (OSError, http.client.HTTPException) as exc:
            raise self.unreachable(exc) from None
        finally:
            conn.close()

    def _json(self, method: str, path: str, where: str) -> dict[str, Any]:
        status, _, raw = self.exchange(method, path)
        if status != 200:
            raise error_from_response(status, raw, where)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Unavailable(
                f"model store at {self.url} answered {where} with no JSON object", code="store_unavailable"
            )
        return body

    # -- ModelReader -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The service's own description; Unavailable(`no_store`) when there is no Veil store."""
        try:
            status, _, raw = self.exchange("GET", f"{self._prefix}/v1/store")
        except Unavailable as exc:
            raise Unavailable(
                f"{exc.message}: no model store there (start `veil store serve`)", code="no_store"
            ) from None
        try:
            body = json.loads(raw) if status == 200 else None
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("service") != SERVICE:
            raise Unavailable(f"{self.url} is not a Veil model store (GET /v1/store: HTTP {status})", code="no_store")
        return body

    def open(self, model_id: str, version: int, *, offset: int = 0) -> RemoteBlob:
        return RemoteBlob(self, self.blob_path(model_id, version), f"model {model_id!r} version {version}", offset)

    def stat(self, model_id: str, version: int) -> BlobInfo:
        status, headers, raw = self.exchange("HEAD", self.blob_path(model_id, version))
        if status != 200:
            raise error_from_response(status, raw, f"model {model_id!r} version {version}")
        return BlobInfo(size=int(headers.get("Content-Length") or 0), etag=headers.get("ETag") or "")

    def exists(self, model_id: str, version: int) -> bool:
        try:
            self.stat(model_id, version)
        except NotFound:
            return False
        return True

    def versions(self, model_id: str) -> list[int]:
        path = f"{self._prefix}/v1/models/{check_identifier(model_id, 'model')}/versions"
        found = self._json("GET", path, f"versions of {model_id!r}").get("versions")
        if not isinstance(found, list) or not all(type(v) is int for v in found):
            raise Unavailable(f"model store at {self.url}: malformed version list", code="store_unavailable")
        return sorted(found)


class RemoteBlob(ResumableBlob):
    """One sealed file streamed from the store, read like a local file, resumed by range (bound
    to its ETag) if the transfer breaks."""

    _STREAM_ERRORS = (OSError, http.client.HTTPException)

    def __init__(self, reader: HttpModelReader, path: str, what: str, offset: int = 0) -> None:
        super().__init__(what, reader.resumes, offset)
        self._reader = reader
        self._path = path
        self._conn: http.client.HTTPConnection | None = None
        self._request()

    def _request(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self._pos:
            headers["Range"] = f"bytes={self._pos}-"
        if self._etag:
            headers["If-Match"] = self._etag
        self._drop()
        conn = self._reader.connection()
        try:
            conn.request("GET", self._path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._reader.unreachable(exc) from None
        if resp.status == 416 and self._size is not None and self._pos >= self._size:
            conn.close()  # resumed exactly at the end: nothing left to read
            return
        if resp.status not in (200, 206) or (resp.status == 200 and self._pos):
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            conn.close()
            if resp.status == 412:
                raise self._changed()
            if resp.status == 200:
                raise Unavailable(f"model store ignored a range request for {self._where}", code="store_unavailable")
            raise error_from_response(resp.status, raw, self._where)
        etag = resp.getheader("ETag")
        if resp.status == 206:
            match = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
            if match is None or int(match.group(1)) != self._pos:
                conn.close()
                raise Unavailable(f"model store sent a wrong range for {self._where}", code="store_unavailable")
            size = int(match.group(3))
        else:
            size = int(resp.getheader("Content-Length") or -1)
            if size < 0:
                conn.close()
                raise Unavailable(f"model store sent {self._where} without a length", code="store_unavailable")
        if self._size is not None and size != self._size:
            conn.close()
            raise self._changed()
        self._size, self._etag = size, self._etag or etag
        self._conn, self._stream = conn, resp

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._stream = None
