"""Gateway app: `/v1/models/{model}:infer` (TEE and hybrid envelopes), the HE routes
(`veil.gateway.he_routes`), owner-signed uploads of sealed models and HE model blobs, `/healthz`,
Prometheus `/metrics` and the OpenAPI schema FastAPI generates.

Body limits (docs/he-serving.md): inference bodies ≤ `MAX_ENVELOPE` (32 MiB) here, below the
runtime's 48 MiB `/run` limit, so whatever the gateway admits an instance accepts; evaluation
keys (≤ 256 MiB) and models (≤ 2 GiB) stream into the model store and never pass through `/run`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from veil import openapi_bodies as bodies
from veil.crypto import chunked
from veil.crypto.encoding import b64d
from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, check_identifier, is_binary
from veil.crypto.errors import CryptoError
from veil.crypto.identity import HEADER_PRINCIPAL, verify_signature
from veil.errors import BadRequest, Conflict, Forbidden, TooLarge, Unauthorized, Unavailable, VeilError
from veil.gateway.he_routes import install_he_routes
from veil.gateway.he_split import Spreader
from veil.gateway.routing import Router
from veil.he import bundle
from veil.he.errors import HEError
from veil.he.keys import MAX_KEY_BYTES
from veil.http import install_error_handlers, parse_json_object, read_body
from veil.keyservice import wire
from veil.platform.protocol import binary_envelopes
from veil.store import ModelStore

MAX_ENVELOPE = 32 << 20
MAX_MODEL = 2 << 30
#: threads that run inference calls into the (blocking) routers, as many as anyio's default
INVOKE_THREADS = 40


async def run_blocking(pool: Executor, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on `pool`, awaited. The hop every inference request makes onto a
    thread: a plain executor costs about 25 us less per call than Starlette's
    `run_in_threadpool` (anyio's capacity limiter and checkpoints), measured 54 vs 79 us."""
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))


class EnvelopedError(VeilError):
    """A runtime error after the request authenticated: a code in clear, the details in an
    envelope only the user can open. The gateway passes the envelope through untouched."""

    def __init__(self, message: str, *, code: str, status: int, envelope: dict) -> None:
        super().__init__(message, code=code, status=status)
        self.envelope = envelope

    def to_json(self) -> dict:
        return {**super().to_json(), "envelope": self.envelope}


def _status(exc: BaseException) -> VeilError:
    """Platform errors carry code/status/message (and the action's own error body)."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status", 502)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message, code = str(err.get("message", "action failed")), str(err.get("code", "action_error"))
        envelope = body.get("envelope", err.get("envelope"))
        if isinstance(envelope, dict):
            return EnvelopedError(message, code=code, status=status, envelope=envelope)
        return VeilError(message, code=code, status=status)
    if isinstance(body, dict) and "code" in body:
        message, code = str(body.get("message", "action failed")), str(body["code"])
        if isinstance(body.get("envelope"), dict):  # the platform kept only the action's error object
            return EnvelopedError(message, code=code, status=status, envelope=body["envelope"])
        return VeilError(message, code=code, status=status)
    code = getattr(exc, "code", "platform_error")
    message = getattr(exc, "message", None) or str(exc)
    return VeilError(message, code=str(code), status=status if isinstance(status, int) else 502)


TIMEOUT_HEADER = "x-veil-timeout-ms"


def _time_left(request: Request | None, ceiling_s: float) -> float:
    """The caller's remaining time (`x-veil-timeout-ms`), never more than the gateway's own."""
    raw = request.headers.get(TIMEOUT_HEADER) if request is not None else None
    if raw is None:
        return ceiling_s
    if not raw.isdigit() or len(raw) > 12:
        raise BadRequest(f"{TIMEOUT_HEADER}: must be a whole number of milliseconds", code="malformed")
    left = int(raw) / 1000
    if left <= 0:
        raise VeilError("the request's deadline passed before the gateway got it", code="deadline_exceeded", status=504)
    return min(ceiling_s, left)


def _check_sealed_head(head: bytes, model: str, number: int) -> None:
    try:
        header = chunked.read_header(io.BytesIO(head))
    except CryptoError as exc:
        raise BadRequest(f"body: not a Veil sealed model ({exc})", code="malformed") from None
    if header.get("model") != model or header.get("version") != number:
        raise BadRequest(
            f"body: sealed for {header.get('model')!r} v{header.get('version')}, not {model!r} v{number}",
            code="malformed",
        )


def _check_he_head(head: bytes, model: str, number: int) -> None:
    try:
        header = bundle.read_header(head)
    except HEError as exc:
        raise BadRequest(f"body: not a Veil HE model blob ({exc.message})", code="malformed") from None
    if header["model"] != model:
        raise BadRequest(f"body: an HE blob of {header['model']!r}, not {model!r}", code="malformed")


def create_app(
    router: Router,
    store: ModelStore,
    *,
    keyservice_url: str,
    he_router: Router | None = None,
    platform: Any = None,
    timeout_s: float = 120.0,
    max_model_bytes: int = MAX_MODEL,
    max_key_bytes: int = MAX_KEY_BYTES,
    he_function: str | None = None,
    he_platform: Any = None,
) -> FastAPI:
    """The gateway over `router` (TEE and hybrid envelopes) and `he_router` (HE mode), writing
    `store`. `he_function` names the function behind `he_router` on `he_platform` (default
    `platform`), so a throughput batch can be spread over its instances."""
    invoke_pool = ThreadPoolExecutor(max_workers=INVOKE_THREADS, thread_name_prefix="veil-gateway-invoke")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            invoke_pool.shutdown(wait=False)

    app = FastAPI(
        lifespan=lifespan,
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

    async def call(
        r: Router | None,
        model: str,
        value: dict[str, Any],
        mode: str,
        request: Request | None = None,
        *,
        runner: Callable[[float], Awaitable[dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """Run one request on `r` (or through `runner(timeout)`), counted and timed by mode."""
        t0 = time.perf_counter()
        timeout = _time_left(request, timeout_s)
        try:
            if runner is not None:
                result = await runner(timeout)
            else:
                assert r is not None
                result = await run_blocking(invoke_pool, r.invoke, model, value, timeout=timeout)
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

    registry_client = httpx.AsyncClient(base_url=keyservice_url, timeout=10.0)

    async def registry_get(path: str) -> dict[str, Any]:
        """A public GET to the KeyService, its refusals passed on with their code (a 5xx as 502)."""
        try:
            answer = await registry_client.get(path)
        except httpx.HTTPError as exc:
            raise Unavailable(f"KeyService unreachable: {type(exc).__name__}", code="keyservice_unavailable") from None
        try:
            body = answer.json()
        except ValueError:
            raise VeilError(
                "KeyService answered something that is not JSON", code="keyservice_error", status=502
            ) from None
        if answer.status_code != 200:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise VeilError(
                str(err.get("message", "KeyService refused")),
                code=str(err.get("code", "keyservice_error")),
                status=answer.status_code if answer.status_code < 500 else 502,
            )
        return body

    async def staged_version(model: str, version: int) -> dict[str, Any]:
        """Ask the KeyService (the principal registry) who owns `model` and whether `version` is
        staged. The answer decides only what this untrusted store accepts; runtimes check every
        file cryptographically against the release anyway."""
        return await registry_get(f"/v1/models/{model}/versions/{version}")

    @app.get("/v1/models/{model}/card")
    async def model_card(model: str) -> dict:
        """The owner-signed card of the model's current version, relayed from the KeyService.
        Public; clients verify the owner's signature (this gateway is not trusted to)."""
        check_identifier(model, "model")
        return await registry_get(f"/v1/models/{model}/card")

    @app.put("/v1/models/{model}/versions/{version}/sealed", openapi_extra=bodies.binary_body())
    async def upload_sealed(model: str, version: str, request: Request) -> dict:
        """Store the sealed file of a staged version. Only its owner may write it: the upload carries
        the owner's signature over (model, version, SHA-256 of the file), checked against the
        KeyService's principal registry before the file becomes visible; the body streams to disk
        under a size limit, never buffered whole."""
        return await upload_version(model, version, request, _check_sealed_head)

    @app.put("/v1/models/{model}/versions/{version}/he", openapi_extra=bodies.binary_body())
    async def upload_he(model: str, version: str, request: Request) -> dict:
        """Store the HE model blob (`veil.he.bundle`) of a staged HE-mode version: signed by the
        owner exactly like a sealed upload. Its weights are in clear by design (HE mode hides
        inputs and outputs; hybrid mode seals the blob and uses the `sealed` route)."""
        return await upload_version(model, version, request, _check_he_head)

    async def upload_version(
        model: str, version: str, request: Request, check_head: Callable[[bytes, str, int], None]
    ) -> dict:
        check_identifier(model, "model")
        if model.startswith(wire.RESERVED_MODEL_PREFIX):
            raise BadRequest(f"model: ids starting with {wire.RESERVED_MODEL_PREFIX!r} are reserved", code="malformed")
        if not version.isdigit() or not 0 < len(version) <= 15 or int(version) < 1:
            raise BadRequest("version: must be a positive integer", code="malformed")
        number = int(version)
        principal = request.headers.get(HEADER_PRINCIPAL)
        signature_text = request.headers.get(wire.HEADER_UPLOAD_SIGNATURE)
        if not principal or not signature_text:
            raise Unauthorized(
                f"upload must be signed by the model's owner ({HEADER_PRINCIPAL}, {wire.HEADER_UPLOAD_SIGNATURE})",
                code="unsigned_upload",
            )
        signature = b64d(signature_text, wire.HEADER_UPLOAD_SIGNATURE)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_model_bytes:
            raise TooLarge(f"sealed model of {declared} bytes exceeds the {max_model_bytes}-byte limit")
        info = await staged_version(model, number)
        if not hmac.compare_digest(str(info.get("owner", "")), principal):
            raise Forbidden(f"only the owner of model {model!r} may upload it", code="not_owner")
        if info.get("state") != "staged":
            raise Conflict(f"model {model!r} version {number} is {info.get('state')}, not staged", code="not_staged")
        owner_key = b64d(info.get("owner_public_key", ""), "owner_public_key")
        # a network store's calls block on I/O: keep them off the event loop
        upload = await run_in_threadpool(lambda: store.begin_upload(model, number, max_bytes=max_model_bytes))
        try:
            async for chunk in request.stream():
                await run_in_threadpool(upload.write, chunk)
            try:
                verify_signature(owner_key, wire.upload_payload(model, number, upload.sha256()), signature)
            except CryptoError:
                raise Forbidden(
                    "upload signature does not verify with the owner's key (or the file changed)",
                    code="bad_upload_signature",
                ) from None
            check_head(upload.head, model, number)
            size = await run_in_threadpool(upload.commit)
        finally:
            upload.abort()
        current = info.get("current_version") or 0
        for old in await run_in_threadpool(store.versions, model):
            if old < current:  # neither current nor newer: nothing will be released for it again
                await run_in_threadpool(store.delete, model, old)
        return {"v": 1, "model": model, "version": number, "bytes": size}

    # the binary envelope form goes to the platform as it came only if the platform takes it
    # (`binary_envelopes`, e.g. the local one); otherwise it is re-encoded as the JSON form
    binary_platform = binary_envelopes(platform)

    @app.post("/v1/models/{model}:infer", openapi_extra=bodies.ENVELOPE, response_class=Response)
    async def infer(model: str, request: Request) -> Response:
        """Encrypted envelope in, encrypted envelope out (TEE and hybrid models), in the JSON
        form or the binary one (`application/vnd.veil.envelope`, docs/protocol.md). A binary
        envelope's ciphertext is neither decoded nor copied here: its header is checked (and
        names the model) and the body goes on as it came. The answer is the runtime's, in the
        form it answered (binary to a binary request, unless the platform takes only JSON);
        JSON is encoded once here, not walked by FastAPI's response encoder."""
        body = await read_body(request, MAX_ENVELOPE)
        binary = is_binary(request.headers.get("content-type"))
        if binary:
            envelope = Envelope.from_binary(body)
            value: dict[str, Any] = {"envelope": body if binary_platform else envelope.to_json()}
        else:
            obj = parse_json_object(body)
            envelope = Envelope.from_json(obj, decode_ct=False)
            value = {"envelope": obj}
        if envelope.model != model:
            raise BadRequest(f"envelope.model is {envelope.model!r} but the URL names {model!r}", code="malformed")
        answer = await call(router, model, value, "tee", request)
        sealed = answer.get("envelope")
        if isinstance(sealed, bytes) and len(answer) == 1:
            return Response(sealed, media_type=BINARY_CONTENT_TYPE)
        return Response(json.dumps(answer, separators=(",", ":")).encode(), media_type="application/json")

    spreader = None
    if he_router is not None and he_function:
        he_invoke = he_router.invoke
        spreader = Spreader(
            he_platform or platform, he_function, lambda key, value, timeout: he_invoke(key, value, timeout=timeout)
        )
    install_he_routes(
        app,
        store=store,
        registry_get=registry_get,
        call=call,
        he_router=he_router,
        spreader=spreader,
        max_request_bytes=MAX_ENVELOPE,
        max_key_bytes=max_key_bytes,
    )

    return app
