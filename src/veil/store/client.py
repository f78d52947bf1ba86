"""The writer side of the network store, and `open_store` for anything that is not the runtime.

`HttpModelStore` is an `HttpModelReader` that can also write to `veil store serve`: the gateway
streams an owner's upload through it without buffering the file. Uploads are staged on the service
(`PUT ...?stage=1`, chunked) and become visible only on `commit`, after the gateway checked the
owner's signature over the SHA-256 both sides computed; `abort` (or a dropped connection) leaves
nothing. Writes carry `Authorization: Bearer <token>` when the service was given one.

    PUT    /v1/models/{model}/versions/{version}?stage=1   body streamed -> 201 {"upload_id", "sha256", "bytes"}
    POST   /v1/uploads/{upload_id}/commit                  {"sha256"} -> 200, now readable
    DELETE /v1/uploads/{upload_id}                         abort a staged upload
    DELETE /v1/models/{model}/versions/{version}           remove a version
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from veil.errors import StoreIntegrityError, TooLarge, Unavailable
from veil.store.base import ModelStore, TalliedUpload, Tally, copy_into
from veil.store.local import LocalModelStore
from veil.store.remote import HttpModelReader, error_from_response

TOKEN_ENV = "VEIL_STORE_TOKEN"  # noqa: S105 - the name of a variable, not a secret


class HttpUpload(TalliedUpload):
    """A staged upload to `veil store serve`, streamed as HTTP/1.1 chunks as `write` is called."""

    def __init__(self, store: HttpModelStore, model_id: str, version: int, max_bytes: int | None) -> None:
        self._store = store
        self._path = store.blob_path(model_id, version) + "?stage=1"
        self._what = f"upload of model {model_id!r} version {version}"
        self._tally = Tally(max_bytes)
        self._conn: http.client.HTTPConnection | None = None
        self._upload_id: str | None = None
        self._done = False

    def _start(self) -> http.client.HTTPConnection:
        conn = self._store.connection()
        try:
            conn.putrequest("PUT", self._path, skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Transfer-Encoding", "chunked")
            for name, value in self._store.auth_headers().items():
                conn.putheader(name, value)
            conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._store.unreachable(exc) from None
        self._conn = conn
        return conn

    def _answer(self) -> tuple[int, bytes]:
        assert self._conn is not None
        resp = self._conn.getresponse()
        return resp.status, resp.read()

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError(f"{self._what} is already finished")
        try:
            self._tally.add(chunk)
        except TooLarge:
            self.abort()
            raise
        if not chunk:
            return
        conn = self._conn or self._start()
        try:
            conn.send(b"%x\r\n" % len(chunk))
            conn.send(chunk)
            conn.send(b"\r\n")
        except OSError as exc:
            # the service may have answered early (a 413, a 401) and closed: report its answer
            err: Exception = self._store.unreachable(exc)
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, raw = self._answer()
                err = error_from_response(status, raw, self._what)
            self.abort()
            raise err from None

    def commit(self) -> int:
        if self._done:
            raise ValueError(f"{self._what} is already finished")
        conn = self._conn or self._start()
        try:
            conn.send(b"0\r\n\r\n")
            status, raw = self._answer()
        except (OSError, http.client.HTTPException) as exc:
            self.abort()
            raise self._store.unreachable(exc) from None
        finally:
            conn.close()
            self._conn = None
        if status != 201:
            self.abort()
            raise error_from_response(status, raw, self._what)
        body = json.loads(raw)
        self._upload_id = str(body.get("upload_id", ""))
        if body.get("sha256") != self.sha256() or body.get("bytes") != self.size:
            self.abort()
            raise StoreIntegrityError(f"{self._what}: the store received other bytes than were sent")
        status, _, raw = self._store.exchange(
            "POST",
            f"{self._store.uploads_path(self._upload_id)}/commit",
            body=json.dumps({"sha256": self.sha256()}).encode(),
            headers={"Content-Type": "application/json", **self._store.auth_headers()},
        )
        if status != 200:
            self.abort()
            raise error_from_response(status, raw, self._what)
        self._done = True
        return self.size

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._conn is not None:
            self._conn.close()  # the service discards a body that never finished
            self._conn = None
        if self._upload_id:
            with contextlib.suppress(Unavailable):
                self._store.exchange(
                    "DELETE", self._store.uploads_path(self._upload_id), headers=self._store.auth_headers()
                )


class HttpModelStore(HttpModelReader):
    """Read and write the sealed models of a `veil store serve` at `url`.

    `token` (default: the `VEIL_STORE_TOKEN` environment variable) is sent with writes; reads need
    none (the service holds only ciphertext)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 60.0, check: bool = True) -> None:
        super().__init__(url, timeout=timeout, check=check)
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def uploads_path(self, upload_id: str) -> str:
        return f"{self._prefix}/v1/uploads/{quote(upload_id, safe='')}"

    def begin_upload(self, model_id: str, version: int, *, max_bytes: int | None = None) -> HttpUpload:
        return HttpUpload(self, model_id, version, max_bytes)

    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int:
        return copy_into(self.begin_upload(model_id, version, max_bytes=max_bytes), source)

    def delete(self, model_id: str, version: int) -> None:
        status, _, raw = self.exchange("DELETE", self.blob_path(model_id, version), headers=self.auth_headers())
        if status not in (200, 204, 404):
            raise error_from_response(status, raw, f"delete of model {model_id!r} version {version}")


def open_store(location: str | Path, *, create: bool = False, token: str | None = None, **options: Any) -> ModelStore:
    """The store at `location`, for the gateway, the operator and tests:

    - a directory (`create=True` makes it; otherwise it must exist),
    - `http(s)://host:port[/prefix]`: a `veil store serve` (`token` for writes),
    - `s3://bucket[/prefix]`: an S3-compatible bucket (`veil[s3]`; `endpoint_url=` and the usual
      AWS environment variables, including `AWS_ENDPOINT_URL`, pick the service).

    A store that does not exist is `Unavailable(code="no_store")`."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        return HttpModelStore(text, token=token, **options)
    if text.startswith("s3://"):
        from veil.store.s3 import S3ModelStore

        return S3ModelStore.from_url(text, create=create, **options)
    if "://" in text:
        raise ValueError(f"model store location {text!r}: expected a directory, http(s):// or s3://")
    return LocalModelStore(Path(text), create=create)
