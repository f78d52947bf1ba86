"""`veil store serve`: the untrusted HTTP blob service every node reads sealed models from.

It holds only Veil's blobs (`veil.wire.blobs`): sealed files (whose header names the model and
version they are stored under), HE model blobs, and users' evaluation-key records (stored under
their own SHA-256, which is checked), versioned like the local store, over any `ModelStore`
backend: a directory, or an S3-compatible bucket. Runtimes stream files with plain GETs and resume
with range requests (`veil.store.remote`); writers stream uploads that are size-limited, staged
and committed atomically (`veil.store.client`). Nothing here is trusted: a store that lies can only
make a runtime refuse a model (every file is checked against the KeyService's release), so the
service needs no TEE; `--write-token-file` keeps strangers from deleting or replacing files.

Errors are `{"error": {"code", "message"}}` with the HTTP status, like every Veil service.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from veil.crypto.envelope import check_identifier
from veil.errors import BadRequest, NotFound, TooLarge, Unauthorized, VeilError
from veil.http import install_error_handlers, parse_json_object, read_body
from veil.store.base import ModelStore, Upload
from veil.store.local import LocalModelStore
from veil.store.remote import SERVICE
from veil.wire import blobs

log = logging.getLogger("veil.store.server")
MAX_BYTES = 2 << 30
STAGE_TTL_S = 3600.0
SEND_CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class _Staged:
    upload: Upload
    model: str
    version: int
    created: float


def _version(text: str) -> int:
    if not text.isdigit() or not 0 < len(text) <= 15 or int(text) < 1:
        raise BadRequest("version: must be a positive integer", code="malformed")
    return int(text)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `Range: bytes=...` request, None to send the whole file.

    A header that does not parse, or asks for several ranges, is ignored (RFC 9110 lets a server
    answer 200 with the whole file); a range wholly past the end raises 416."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise VeilError(f"range {header!r} is not satisfiable for {size} bytes", code="bad_range", status=416)
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        raise VeilError(f"range {header!r} is not satisfiable for {size} bytes", code="bad_range", status=416)
    return start, end


def create_store_app(
    backend: ModelStore,
    *,
    max_bytes: int = MAX_BYTES,
    write_token: str | None = None,
    stage_ttl_s: float = STAGE_TTL_S,
) -> FastAPI:
    """The store service over `backend`. Writes need `Authorization: Bearer <write_token>` when a
    token is set; reads never do."""
    app = FastAPI(
        title="Veil model store",
        version="1",
        description="Untrusted blob service for sealed (encrypted) models: versioned, range reads, staged uploads.",
    )
    install_error_handlers(app)
    staged: dict[str, _Staged] = {}
    lock = threading.Lock()

    def authorize(request: Request) -> None:
        if write_token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), write_token.encode()):
            raise Unauthorized(
                "writing to this model store needs its write token (Authorization: Bearer)", code="unauthorized"
            )

    def expire() -> None:
        now = time.monotonic()
        with lock:
            old = [key for key, s in staged.items() if now - s.created > stage_ttl_s]
            gone = [staged.pop(key) for key in old]
        for s in gone:
            s.upload.abort()

    def take(upload_id: str) -> _Staged:
        with lock:
            found = staged.pop(upload_id, None)
        if found is None:
            raise NotFound(f"no staged upload {upload_id!r} (expired, committed or aborted)", code="unknown_upload")
        return found

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/store")
    async def describe() -> dict:
        return {
            "v": 1,
            "service": SERVICE,
            "backend": type(backend).__name__,
            "max_bytes": max_bytes,
            "writes": "token" if write_token is not None else "open",
        }

    @app.get("/v1/models/{model}/versions")
    async def versions(model: str) -> dict:
        check_identifier(model, "model")
        return {"v": 1, "model": model, "versions": await run_in_threadpool(backend.versions, model)}

    @app.api_route("/v1/models/{model}/versions/{version}", methods=["GET", "HEAD"])
    async def read(model: str, version: str, request: Request) -> Response:
        """The sealed file, whole or one byte range, streamed from the backend."""
        check_identifier(model, "model")
        number = _version(version)
        info = await run_in_threadpool(backend.stat, model, number)
        headers = {"Accept-Ranges": "bytes", "ETag": info.etag, "Content-Type": "application/octet-stream"}
        if_match = request.headers.get("if-match")
        if if_match is not None and if_match.strip() not in ("*", info.etag):
            raise VeilError(
                f"model {model!r} version {number} is not the file asked for (If-Match)",
                code="precondition_failed",
                status=412,
            )
        try:
            span = parse_range(request.headers.get("range"), info.size)
        except VeilError:
            return JSONResponse(
                {"error": {"code": "bad_range", "message": f"range not satisfiable for {info.size} bytes"}},
                status_code=416,
                headers={**headers, "Content-Range": f"bytes */{info.size}"},
            )
        first, last = span if span is not None else (0, info.size - 1)
        length = max(0, last - first + 1)
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        source = await run_in_threadpool(lambda: backend.open(model, number, offset=first))

        def body() -> Iterator[bytes]:
            remaining = length
            try:
                while remaining > 0:
                    chunk = source.read(min(SEND_CHUNK, remaining))
                    if not chunk:
                        log.error("model %s v%d: backend ended %d bytes early", model, number, remaining)
                        return
                    remaining -= len(chunk)
                    yield chunk
            finally:
                source.close()

        return StreamingResponse(body(), status_code=status, headers=headers)

    @app.put("/v1/models/{model}/versions/{version}", status_code=201)
    async def write(model: str, version: str, request: Request, stage: int = 0) -> JSONResponse:
        """Stream one sealed file in, under the size limit. With `?stage=1` it stays invisible
        until `POST /v1/uploads/{upload_id}/commit`; otherwise it is committed at once."""
        authorize(request)
        check_identifier(model, "model")
        number = _version(version)
        expire()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise TooLarge(f"sealed model of {declared} bytes exceeds the {max_bytes}-byte limit")
        upload = await run_in_threadpool(lambda: backend.begin_upload(model, number, max_bytes=max_bytes))
        kept = False
        try:
            async for chunk in request.stream():
                if chunk:
                    await run_in_threadpool(upload.write, chunk)
            try:
                kind = blobs.kind_of(upload.head, model, number)
            except ValueError as exc:
                raise BadRequest(f"body: {exc}; this store keeps only Veil's blobs", code="not_sealed") from None
            if kind == "he_keys" and upload.sha256() != model[len(blobs.KEY_PREFIX) :]:
                raise BadRequest("body: an evaluation-key record is stored under its own SHA-256", code="not_sealed")
            answer: dict[str, Any] = {
                "v": 1,
                "model": model,
                "version": number,
                "bytes": upload.size,
                "sha256": upload.sha256(),
            }
            if stage:
                upload_id = secrets.token_urlsafe(18)
                with lock:
                    staged[upload_id] = _Staged(upload, model, number, time.monotonic())
                kept = True
                return JSONResponse({**answer, "upload_id": upload_id, "staged": True}, status_code=201)
            await run_in_threadpool(upload.commit)
            return JSONResponse(answer, status_code=201)
        finally:
            if not kept:
                upload.abort()

    @app.post("/v1/uploads/{upload_id}/commit")
    async def commit(upload_id: str, request: Request) -> dict:
        """Make a staged upload visible, if it is still the bytes the writer checked."""
        authorize(request)
        body = parse_json_object(await read_body(request, 4096))
        s = take(upload_id)
        try:
            if not isinstance(body.get("sha256"), str) or not hmac.compare_digest(body["sha256"], s.upload.sha256()):
                raise VeilError("staged upload's SHA-256 is not the one given", code="upload_mismatch", status=409)
            size = await run_in_threadpool(s.upload.commit)
        finally:
            s.upload.abort()
        return {"v": 1, "model": s.model, "version": s.version, "bytes": size}

    @app.delete("/v1/uploads/{upload_id}")
    async def abort(upload_id: str, request: Request) -> dict:
        authorize(request)
        try:
            s = take(upload_id)
        except NotFound:
            return {"v": 1, "aborted": False}
        await run_in_threadpool(s.upload.abort)
        return {"v": 1, "aborted": True}

    @app.delete("/v1/models/{model}/versions/{version}")
    async def delete(model: str, version: str, request: Request) -> dict:
        authorize(request)
        check_identifier(model, "model")
        number = _version(version)
        await run_in_threadpool(backend.delete, model, number)
        return {"v": 1, "model": model, "version": number, "deleted": True}

    return app


def serve(
    backend: ModelStore,
    host: str,
    port: int,
    *,
    max_bytes: int = MAX_BYTES,
    write_token: str | None = None,
) -> None:
    """Serve until interrupted (uvicorn, no access log: paths name models)."""
    import uvicorn

    if isinstance(backend, LocalModelStore):
        swept = backend.sweep_uploads(STAGE_TTL_S)
        if swept:
            log.warning("removed %d unfinished uploads left by an earlier run", swept)
    if write_token is None:
        log.warning(
            "model store writes are OPEN: anyone who reaches %s:%d may replace or delete sealed files "
            "(give --write-token-file)",
            host,
            port,
        )
    app = create_store_app(backend, max_bytes=max_bytes, write_token=write_token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
