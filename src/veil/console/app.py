"""The console's HTTP surface: the static page, one state document, and POST actions.

Thin: check the request (`AccessGuard`), parse, run the blocking SDK work in the thread pool
(`Actions`, `build_state`), answer JSON. Errors are the project's `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from veil.console.actions import Actions
from veil.console.context import ConsoleContext
from veil.console.guard import AccessGuard
from veil.console.state import build_state
from veil.errors import BadRequest, NotFound
from veil.http import install_error_handlers, parse_json_object, read_body

MAX_ACTION_BODY = 8 << 20
MAX_MODEL_BYTES = 2 << 30  # the gateway's own limit on a sealed model
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def _static(name: str) -> Response:
    if name not in STATIC_FILES:
        raise NotFound(f"no such file: {name}")
    data = resources.files("veil.console").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC_FILES[name])


def _require_type(request: Request, expected: str) -> None:
    """Actions take only their own body type: a cross-site form cannot send one without a
    preflight, which this console never answers."""
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != expected:
        raise BadRequest(f"content-type must be {expected}, not {got or 'none'}", code="bad_content_type")


async def _json(request: Request) -> dict[str, Any]:
    _require_type(request, "application/json")
    return parse_json_object(await read_body(request, MAX_ACTION_BODY))


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string", code="malformed")
    return value


def _optional_delay(value: object, name: str) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not int or not 0 <= value <= 300:
        raise BadRequest(f"{name}: whole seconds from 0 to 300", code="malformed")
    return value


def create_app(ctx: ConsoleContext, guard: AccessGuard) -> FastAPI:
    """The console app for one principal's context, guarded by `guard` (token, Host, Origin)."""
    app = FastAPI(title="Veil console", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.middleware("http")(guard.middleware)
    actions = Actions(ctx)

    @app.get("/")
    async def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        return _static(name)

    @app.get("/api/state")
    async def state() -> dict[str, Any]:
        return await run_in_threadpool(build_state, ctx)

    @app.post("/api/owner/publish")
    async def publish(request: Request) -> dict[str, Any]:
        """Body: the ONNX file itself; model id, delay and description in the query string."""
        _require_type(request, "application/octet-stream")
        query = request.query_params
        delay = _optional_delay(query.get("revocation_delay_s"), "revocation_delay_s")
        description = query.get("description", "")
        onnx = await read_body(request, MAX_MODEL_BYTES)
        return await run_in_threadpool(
            lambda: actions.publish(query.get("model", ""), onnx, revocation_delay_s=delay, description=description)
        )

    @app.post("/api/owner/grant")
    async def grant(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await run_in_threadpool(actions.grant, _text(body, "model"), _text(body, "user"))

    @app.post("/api/owner/revoke")
    async def revoke(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await run_in_threadpool(actions.revoke, _text(body, "model"), _text(body, "user"))

    @app.post("/api/user/request-access")
    async def request_access(request: Request) -> dict[str, Any]:
        body = await _json(request)
        delay = _optional_delay(body.get("max_revocation_delay_s"), "max_revocation_delay_s")
        model = _text(body, "model")
        return await run_in_threadpool(lambda: actions.request_access(model, max_revocation_delay_s=delay))

    @app.post("/api/user/infer")
    async def infer(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await run_in_threadpool(actions.infer, _text(body, "model"), _text(body, "inputs"))

    @app.post("/api/watch")
    async def watch(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await run_in_threadpool(actions.watch, _text(body, "model"))

    return app
