"""The gateway's HE routes: evaluation-key uploads into the model store, and HE inference.

    GET  /v1/he/models/{model}/keys/{key_id}   does the store hold this key record? (public)
    PUT  /v1/he/models/{model}/keys            eval-key blob, streamed into the store as a record
    POST /v1/he/models/{model}:infer           an HE-mode request (signed by the user)
    GET  /v1/he/models/{model}/spec            the current version's client spec (from its card)

Who may do what is decided from the KeyService: the user's public key and the owner's grant
(`GET /v1/models/{model}/access/{user}`, cached for a few seconds, never longer than the model's
revocation delay), and the current version and mode from the model's card. Hybrid models are
served through `/v1/models/{model}:infer` (envelopes the attested runtime opens); their users
upload evaluation keys here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from veil import openapi_bodies as bodies
from veil.attest.errors import AttestationError
from veil.crypto.encoding import b64d
from veil.crypto.envelope import check_identifier
from veil.crypto.errors import CryptoError
from veil.crypto.identity import HEADER_PRINCIPAL, verify_signature
from veil.errors import BadRequest, Conflict, Forbidden, TooLarge, Unauthorized, VeilError, from_exception
from veil.gateway.he_split import Spreader, merge, part_count, split
from veil.he.keys import MAX_KEY_BYTES, record_header, store_id
from veil.http import error_response, parse_json_object, read_body
from veil.jsonbytes import Encoded
from veil.store import ModelStore
from veil.wire import he as he_wire

log = logging.getLogger("veil.gateway.he_routes")
ACCESS_TTL_S = 5.0
CARD_TTL_S = 2.0
_HEX = frozenset("0123456789abcdef")


def _key_id(value: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise BadRequest("key_id: must be 64 lowercase hex digits", code="malformed")
    return value


def _max_parts(request: Request) -> int:
    """The client's cap on how many instances share its batch (`x-veil-he-parts`; 1: no split)."""
    raw = request.headers.get(he_wire.HEADER_HE_PARTS)
    if raw is None:
        return 1 << 10
    if not raw.isdigit() or not 1 <= len(raw) <= 4 or int(raw) < 1:
        raise BadRequest(f"{he_wire.HEADER_HE_PARTS}: must be a positive whole number", code="malformed")
    return int(raw)


class _Ttl:
    """A small thread-safe cache with per-entry expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None or found[0] < time.monotonic():
                return None
            return found[1]

    def put(self, key: Any, value: Any, ttl: float) -> None:
        with self._lock:
            if len(self._items) > 10_000:
                now = time.monotonic()
                self._items = {k: v for k, v in self._items.items() if v[0] >= now}
            self._items[key] = (time.monotonic() + ttl, value)


class Replays:
    """Request ids seen inside their validity window (a replay is refused)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], float] = {}

    def add(self, user: str, request_id: str, until: float) -> bool:
        now = time.time()
        with self._lock:
            if len(self._seen) > 100_000:
                self._seen = {k: t for k, t in self._seen.items() if t >= now}
            if self._seen.get((user, request_id), 0.0) >= now:
                return False
            self._seen[(user, request_id)] = until
            return True


class Verifiers:
    """Users' Ed25519 public keys, loaded once each (a key's bytes name it): every HE request
    checks its signature with one, and loading the key is a tenth of the check."""

    def __init__(self, limit: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._keys: dict[bytes, Ed25519PublicKey | None] = {}
        self.limit = limit

    def verify(self, public_key: bytes, payload: bytes, signature: bytes) -> bool:
        """Whether `signature` is `public_key`'s over `payload` (False for a malformed key)."""
        with self._lock:
            key = self._keys.get(public_key, False)
        if key is False:
            try:
                key = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                key = None
            with self._lock:
                if len(self._keys) >= self.limit:
                    self._keys.clear()
                self._keys[public_key] = key
        if key is None:
            return False
        try:
            key.verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True


INFER_PREFIX, INFER_SUFFIX = "/v1/he/models/", ":infer"


class InferFastPath:
    """ASGI middleware: `POST /v1/he/models/{model}:infer` goes straight to its handler.

    FastAPI's routing (a regular expression per route until one matches) and dependency
    resolution cost about half a millisecond per request on this path, paid by every HE
    request. The FastAPI route stays (the schema, and any path this does not match exactly);
    failures are answered exactly as the app's error handlers answer them."""

    def __init__(self, app: Any, handler: Callable[[str, Request], Awaitable[Response]]) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope.get("type") == "http" and scope.get("method") == "POST" else ""
        model = path[len(INFER_PREFIX) : -len(INFER_SUFFIX)]
        if not (path.startswith(INFER_PREFIX) and path.endswith(INFER_SUFFIX) and model and "/" not in model):
            await self.app(scope, receive, send)
            return
        try:
            response = await self.handler(model, Request(scope, receive))
        except Exception as exc:  # noqa: BLE001 - every failure becomes the standard error body
            err = from_exception(exc)
            if err.status >= 500 and not isinstance(exc, VeilError | CryptoError | AttestationError):
                log.error("unhandled %s on POST %s", type(exc).__name__, INFER_PREFIX + "{model}" + INFER_SUFFIX)
            response = error_response(err)
        await response(scope, receive, send)


def install_he_routes(
    app: FastAPI,
    *,
    store: ModelStore,
    registry_get: Callable[[str], Awaitable[dict[str, Any]]],
    call: Callable[..., Awaitable[dict[str, Any]]],
    he_router: Any,
    spreader: Spreader | None,
    max_request_bytes: int,
    max_key_bytes: int = MAX_KEY_BYTES,
) -> None:
    access_cache, card_cache, replays, verifiers = _Ttl(), _Ttl(), Replays(), Verifiers()

    async def access(model: str, user: str) -> tuple[bytes, bool]:
        found = access_cache.get((model, user))
        if found is None:
            answer = await registry_get(f"/v1/models/{model}/access/{user}")
            found = (b64d(answer.get("public_key", ""), "public_key"), bool(answer.get("granted")))
            ttl = min(ACCESS_TTL_S, float(answer.get("revocation_delay_s", ACCESS_TTL_S) or 0.0))
            if ttl > 0:
                access_cache.put((model, user), found, ttl)
        return found

    async def current(model: str) -> dict[str, Any]:
        """The current version's card (mode, version, extra), as the KeyService relays it."""
        found = card_cache.get(model)
        if found is None:
            answer = await registry_get(f"/v1/models/{model}/card")
            signed = answer.get("signed_card")
            card = signed.get("card") if isinstance(signed, dict) else None
            if not isinstance(card, dict):
                raise VeilError(f"model {model!r} has no usable card", code="no_card", status=404)
            found = {
                "version": answer.get("version"),
                "mode": card.get("mode"),
                "extra": card.get("extra") if isinstance(card.get("extra"), dict) else {},
            }
            card_cache.put(model, found, CARD_TTL_S)
        return found

    def principal(request: Request) -> tuple[str, bytes]:
        user = request.headers.get(HEADER_PRINCIPAL, "")
        text = request.headers.get(he_wire.HEADER_HE_SIGNATURE, "")
        if not user or not text:
            raise Unauthorized(
                f"HE requests are signed by the user ({HEADER_PRINCIPAL}, {he_wire.HEADER_HE_SIGNATURE})",
                code="unsigned_request",
            )
        check_identifier(user, "user")
        return user, b64d(text, he_wire.HEADER_HE_SIGNATURE)

    async def authorise(model: str, user: str, signature: bytes, payload: bytes) -> None:
        public_key, granted = await access(model, user)
        if not verifiers.verify(public_key, payload, signature):
            raise Unauthorized("request signature does not verify with the user's key", code="bad_signature")
        if not granted:
            raise Forbidden(f"the owner of {model!r} has not granted this user access", code="not_granted")

    @app.get("/v1/he/models/{model}/keys/{key_id}")
    async def key_exists(model: str, key_id: str) -> dict:
        """Whether the store holds the evaluation-key record `key_id` (ids reveal nothing)."""
        check_identifier(model, "model")
        kid = _key_id(key_id)
        exists = await run_in_threadpool(store.exists, store_id(kid), 1)
        return {"v": 1, "model": model, "key_id": kid, "stored": exists}

    @app.put("/v1/he/models/{model}/keys", openapi_extra=bodies.binary_body())
    async def upload_keys(model: str, request: Request) -> dict:
        """Stream an evaluation-key blob into the model store, as the record the user's key id
        names, signed by the user and size-limited; any instance fetches it from there."""
        check_identifier(model, "model")
        user, signature = principal(request)
        kid = _key_id(request.headers.get(he_wire.HEADER_HE_KEY_ID, ""))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_key_bytes:
            raise TooLarge(f"evaluation keys of {declared} bytes exceed the {max_key_bytes}-byte limit")
        public_key, granted = await access(model, user)
        if not granted:
            raise Forbidden(f"the owner of {model!r} has not granted this user access", code="not_granted")
        if await run_in_threadpool(store.exists, store_id(kid), 1):
            return {"v": 1, "model": model, "key_id": kid, "stored": True, "cached": True}
        header = record_header(user, model)
        upload = await run_in_threadpool(
            lambda: store.begin_upload(store_id(kid), 1, max_bytes=max_key_bytes + len(header))
        )
        blob_hash = hashlib.sha256()
        try:
            await run_in_threadpool(upload.write, header)
            async for chunk in request.stream():
                blob_hash.update(chunk)
                await run_in_threadpool(upload.write, chunk)
            try:
                payload = he_wire.keys_payload(model, kid, blob_hash.hexdigest())
                verify_signature(public_key, payload, signature)
            except CryptoError:
                raise Unauthorized(
                    "upload signature does not verify with the user's key (or the blob changed)",
                    code="bad_signature",
                ) from None
            if upload.sha256() != kid:
                raise BadRequest(
                    f"{he_wire.HEADER_HE_KEY_ID}: is not the id of this blob for this user and model", code="bad_key_id"
                )
            size = await run_in_threadpool(upload.commit)
        finally:
            upload.abort()
        return {"v": 1, "model": model, "key_id": kid, "stored": True, "cached": False, "bytes": size - len(header)}

    @app.get("/v1/he/models/{model}/spec")
    async def he_spec(model: str) -> dict:
        """The public client spec of the current version, as its owner-signed card states it
        (clients verify the card; this is for tools that only look)."""
        check_identifier(model, "model")
        found = await current(model)
        spec = found["extra"].get("he_spec")
        if found["mode"] not in ("he", "hybrid") or not isinstance(spec, dict):
            raise VeilError(f"model {model!r} is not an HE model", code="not_he", status=404)
        return {"v": 1, "model": model, "version": found["version"], "mode": found["mode"], "spec": spec}

    @app.post("/v1/he/models/{model}:infer", openapi_extra=bodies.HE_OBJECT, response_class=Response)
    async def he_infer(model: str, request: Request) -> Response:
        """An HE-mode request: see `serve_he`; the answer (ciphertexts in base64url) is the
        runtime's JSON as the platform received and parsed it (`veil.jsonbytes.Encoded`), or, for
        a batch put together from parts, encoded once here; never walked by FastAPI's response
        encoder. Served by `InferFastPath`."""
        answer = await serve_he(model, request)
        if isinstance(answer, Encoded):  # the runtime's JSON answer, relayed as it came (parsed and checked)
            return Response(answer.encoded, media_type="application/json")
        return Response(json.dumps(answer, separators=(",", ":")).encode(), media_type="application/json")

    app.add_middleware(InferFastPath, handler=he_infer)

    async def serve_he(model: str, request: Request) -> dict[str, Any]:
        """An HE-mode request: authenticated (user signature, fresh id, expiry), then routed to
        the HE function with the current version and the user named; a throughput batch of
        several groups is spread over instances."""
        if he_router is None:
            raise VeilError("HE mode is not deployed", code="not_deployed", status=404)
        check_identifier(model, "model")
        user, signature = principal(request)
        body = await read_body(request, max_request_bytes)
        obj = parse_json_object(body)
        await authorise(model, user, signature, he_wire.request_payload(model, hashlib.sha256(body).hexdigest()))
        request_id, expires = obj.get("request_id"), obj.get("expires")
        if not isinstance(request_id, str) or not 16 <= len(request_id) <= 64:
            raise BadRequest("request_id: must be a string of 16 to 64 characters", code="malformed")
        now = time.time()
        latest = now + he_wire.MAX_REQUEST_LIFETIME_S
        if type(expires) is not int or not now - he_wire.CLOCK_SKEW_S <= expires <= latest:
            raise BadRequest(
                f"expires: must be Unix seconds within the next {he_wire.MAX_REQUEST_LIFETIME_S} s", code="expired"
            )
        if not replays.add(user, request_id, expires + he_wire.CLOCK_SKEW_S):
            raise Conflict("request id already used within its validity window (replay)", code="replay")
        found = await current(model)
        if found["mode"] != "he":
            raise Conflict(
                f"model {model!r} is served in {found['mode']} mode: send envelopes to /v1/models/{model}:infer",
                code="wrong_mode",
            )
        value = {**obj, "op": "infer", "model": model, "version": found["version"], "user": user}
        key = he_wire.routing_key(model, str(obj.get("key_id", "")))  # prefer the instance holding the keys
        group = found["extra"].get("throughput_group")
        parts, cap = 1, _max_parts(request)
        if spreader is not None and type(group) is int and value.get("packing") == "throughput":
            # only a throughput batch can be split: a latency request never asks the platform
            # for the function's spec (a deep copy per call)
            parts = part_count(value, group, min(spreader.capacity(), cap))
        if parts <= 1:
            return await call(he_router, key, value, "he", request)
        pieces = split(value, group, parts)
        if len(pieces) == 1:
            return await call(he_router, key, value, "he", request)

        async def spread(timeout: float) -> dict[str, Any]:
            assert spreader is not None
            return merge(value, await run_in_threadpool(spreader.run, key, pieces, timeout))

        return await call(None, key, value, "he", request, runner=spread)
