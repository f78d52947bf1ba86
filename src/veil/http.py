"""Shared FastAPI plumbing: error bodies, size limits and JSON parsing with clear messages."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.attest.errors import AttestationError
from veil.crypto.errors import CryptoError
from veil.errors import BadRequest, TooLarge, VeilError, from_exception

log = logging.getLogger("veil.http")


RETRY_AFTER_S = 1  # what a 503 (busy, unavailable) tells clients to wait before trying again


def error_response(err: VeilError) -> JSONResponse:
    """The standard error body; a 503 (the request did not run) also says when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes `{"error": {"code", "message"}}` with the right status, no traceback."""

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        if err.status >= 500:
            log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(err)

    async def _expected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc))

    # Expected failures get their own handlers: Starlette routes a bare `Exception` handler through
    # ServerErrorMiddleware, which answers and then re-raises, so uvicorn would log a traceback and
    # drop the keep-alive connection for every malformed input.
    for expected in (VeilError, CryptoError, AttestationError):
        app.add_exception_handler(expected, _expected)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(BadRequest(f"{where}: {first.get('msg', 'invalid')}", code="malformed"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(VeilError(str(exc.detail), code=code, status=exc.status_code))


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than `limit` bytes without buffering the excess."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body, naming the problem if it is not one."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON ({exc})", code="malformed") from None
    except RecursionError:  # deeply nested arrays/objects: refuse, never a 500
        raise BadRequest("body is nested too deeply", code="malformed") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object", code="malformed")
    return obj
