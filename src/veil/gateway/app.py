"""Gateway app: `/v1/models/{model}:infer` (TEE envelopes), HE routes, sealed-model upload,
`/healthz`, Prometheus `/metrics` and the OpenAPI schema FastAPI generates."""

from __future__ import annotations

import io
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from veil.crypto import chunked
from veil.crypto.envelope import Envelope, check_identifier
from veil.errors import BadRequest, VeilError
from veil.gateway.routing import Router
from veil.http import install_error_handlers, parse_json_object, read_body
from veil.store import LocalModelStore

MAX_ENVELOPE = 32 << 20
MAX_MODEL = 2 << 30


def _status(exc: BaseException) -> VeilError:
    """Platform errors carry code/status/message (and the action's own error body)."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status", 502)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return VeilError(
            str(err.get("message", "action failed")), code=str(err.get("code", "action_error")), status=status
        )
    if isinstance(body, dict) and "code" in body:
        return VeilError(str(body.get("message", "action failed")), code=str(body["code"]), status=status)
    code = getattr(exc, "code", "platform_error")
    message = getattr(exc, "message", None) or str(exc)
    return VeilError(message, code=str(code), status=status if isinstance(status, int) else 502)


def create_app(
    router: Router,
    store: LocalModelStore,
    *,
    he_router: Router | None = None,
    platform: Any = None,
    timeout_s: float = 120.0,
) -> FastAPI:
    app = FastAPI(
        title="Veil gateway",
        version="1",
        description="Private inference: the gateway, platform and store see only ciphertext.",
    )
    install_error_handlers(app)
    registry = CollectorRegistry()
    requests = Counter("veil_requests_total", "Inference requests", ["mode", "outcome"], registry=registry)
    latency = Histogram(
        "veil_request_seconds",
        "Gateway latency of inference requests",
        ["mode"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )

    async def call(r: Router, model: str, value: dict[str, Any], mode: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            result = await run_in_threadpool(r.invoke, model, value, timeout=timeout_s)
        except VeilError:
            requests.labels(mode, "error").inc()
            raise
        except Exception as exc:  # platform and action errors
            requests.labels(mode, "error").inc()
            raise _status(exc) from None
        requests.labels(mode, "ok").inc()
        latency.labels(mode).observe(time.perf_counter() - t0)
        return result

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/platform/metrics")
    async def platform_metrics() -> dict:
        return platform.metrics() if platform is not None else {}

    @app.put("/v1/models/{model}/sealed")
    async def upload_sealed(model: str, request: Request) -> dict:
        """Store a sealed model file. Only ciphertext is accepted; the runtime authenticates it."""
        check_identifier(model, "model")
        body = await read_body(request, MAX_MODEL)
        try:
            header = chunked.read_header(io.BytesIO(body))
        except Exception as exc:
            raise BadRequest(f"body: not a Veil sealed model ({exc})", code="malformed") from None
        if header.get("model") != model:
            raise BadRequest(f"body: sealed for model {header.get('model')!r}, not {model!r}", code="malformed")
        size = await run_in_threadpool(store.put, model, io.BytesIO(body))
        return {"v": 1, "model": model, "bytes": size}

    @app.post("/v1/models/{model}:infer")
    async def infer(model: str, request: Request) -> dict:
        """Encrypted envelope in, encrypted envelope out."""
        obj = parse_json_object(await read_body(request, MAX_ENVELOPE))
        envelope = Envelope.from_json(obj, decode_ct=False)
        if envelope.model != model:
            raise BadRequest(f"envelope.model is {envelope.model!r} but the URL names {model!r}", code="malformed")
        return await call(router, model, {"envelope": obj}, "tee")

    @app.post("/v1/he/keys")
    async def he_keys(request: Request) -> dict:
        if he_router is None:
            raise VeilError("HE mode is not deployed", code="not_deployed", status=404)
        obj = parse_json_object(await read_body(request, MAX_MODEL))
        return await call(he_router, "he-keys", {**obj, "op": "upload_keys"}, "he")

    @app.post("/v1/he/models/{model}:infer")
    async def he_infer(model: str, request: Request) -> dict:
        if he_router is None:
            raise VeilError("HE mode is not deployed", code="not_deployed", status=404)
        check_identifier(model, "model")
        obj = parse_json_object(await read_body(request, MAX_ENVELOPE))
        return await call(he_router, model, {**obj, "op": "infer", "model": model}, "he")

    @app.get("/v1/he/models/{model}/spec")
    async def he_spec(model: str) -> dict:
        """The public client spec of an HE model (parameters, packing): no secrets in it."""
        if he_router is None:
            raise VeilError("HE mode is not deployed", code="not_deployed", status=404)
        check_identifier(model, "model")
        return await call(he_router, model, {"op": "spec", "model": model}, "he")

    return app
