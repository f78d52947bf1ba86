"""The KeyService HTTP API (FastAPI). Thin: parse, authenticate, call `KeyService`, answer JSON."""

from __future__ import annotations

from fastapi import FastAPI, Request

from veil import openapi_bodies as bodies
from veil.attest.evidence import Evidence
from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import check_identifier
from veil.errors import BadRequest
from veil.http import install_error_handlers, parse_json_object, read_body
from veil.keyservice import wire
from veil.keyservice.answers import AnswerSigner
from veil.keyservice.service import KeyService, check_delay, check_digest, check_measurements, decode_field


def _version(obj: dict) -> None:
    if type(obj.get("v")) is not int or obj["v"] != wire.VERSION:
        raise BadRequest(f"v: unsupported version {obj.get('v')!r}, expected {wire.VERSION}", code="malformed")


def _version_number(value: str) -> int:
    if not value.isdigit() or not 0 < len(value) <= 15 or int(value) < 1:
        raise BadRequest("version: must be a positive integer", code="malformed")
    return int(value)


def create_app(ks: KeyService) -> FastAPI:
    """The ASGI app serving `ks`. Every error is `{"error": {"code", "message"}}`; every answer to
    a signed request is itself signed (`AnswerSigner`)."""
    app = FastAPI(title="Veil KeyService", version="1")
    install_error_handlers(app)
    app.add_middleware(AnswerSigner, sign=ks.sign_answer, max_body=wire.MAX_BODY)

    async def signed(request: Request, *, registering_key: bytes | None = None) -> tuple[str, dict]:
        body = await read_body(request, wire.MAX_BODY)
        obj = parse_json_object(body) if body else {}
        if body:
            _version(obj)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        caller = ks.authenticate(request.method, path, body, request.headers, registering_key=registering_key)
        return caller, obj

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/evidence")
    async def evidence(nonce: str) -> dict:
        return ks.evidence(b64d(nonce, "nonce"))

    @app.post("/v1/principals", openapi_extra=bodies.REGISTER)
    async def register(request: Request) -> dict:
        body = await read_body(request, wire.MAX_BODY)
        obj = parse_json_object(body)
        _version(obj)
        public_key = decode_field(obj, "public_key")
        if len(public_key) != 32:
            raise BadRequest("public_key: Ed25519 public key must be 32 bytes", code="malformed")
        path = request.url.path
        caller = ks.authenticate(request.method, path, body, request.headers, registering_key=public_key)
        created = ks.register(caller, public_key)
        return {"v": wire.VERSION, "id": caller, "created": created}

    @app.post("/v1/models/{model}/versions", openapi_extra=bodies.STAGE_VERSION)
    async def stage_version(model: str, request: Request) -> dict:
        """Stage a new version (owner-signed): key, digest, and the allow-list and revocation delay
        that apply once it is committed."""
        check_identifier(model, "model")
        caller, obj = await signed(request)
        measurements = check_measurements(obj["measurements"]) if "measurements" in obj else None
        delay = check_delay(obj["revocation_delay_s"]) if "revocation_delay_s" in obj else None
        version = ks.stage_version(
            caller, model, check_digest(obj.get("digest")), decode_field(obj, "sealed_model_key"), measurements, delay
        )
        return {"v": wire.VERSION, "model": model, "version": version, "state": "staged", "owner": caller}

    @app.post("/v1/models/{model}/versions/{version}/commit", openapi_extra=bodies.EMPTY)
    async def commit_version(model: str, version: str, request: Request) -> dict:
        check_identifier(model, "model")
        number = _version_number(version)
        caller, _ = await signed(request)
        return {"v": wire.VERSION, "state": "current", **ks.commit_version(caller, model, number)}

    @app.get("/v1/models/{model}/versions/{version}")
    async def version_info(model: str, version: str) -> dict:
        """Public: the owner and state of a version (the gateway checks upload signatures with it)."""
        return ks.version_info(check_identifier(model, "model"), _version_number(version))

    @app.put("/v1/models/{model}/versions/{version}/card", openapi_extra=bodies.CARD)
    async def put_card(model: str, version: str, request: Request) -> dict:
        """Attach the owner-signed model card to a staged version."""
        check_identifier(model, "model")
        number = _version_number(version)
        caller, obj = await signed(request)
        ks.put_card(caller, model, number, obj.get("signed_card"))
        return {"v": wire.VERSION, "model": model, "version": number}

    @app.get("/v1/models/{model}/card")
    async def card(model: str) -> dict:
        """Public: the current version's signed card (verify the owner's signature before use)."""
        return ks.current_card(model)

    @app.get("/v1/models/{model}/access/{user}")
    async def access(model: str, user: str) -> dict:
        """Public: the user's public key and whether the owner grants them the model."""
        return ks.access(model, user)

    @app.get("/v1/models/{model}")
    async def model_info(model: str, request: Request) -> dict:
        """Signed: owner, owner key and current version, for verifying the model's card."""
        await signed(request)
        return ks.model_info(check_identifier(model, "model"))

    @app.put("/v1/models/{model}/revocation-delay", openapi_extra=bodies.REVOCATION_DELAY)
    async def put_revocation_delay(model: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, obj = await signed(request)
        delay = check_delay(obj.get("revocation_delay_s"))
        ks.set_revocation_delay(caller, model, delay)
        return {"v": wire.VERSION, "model": model, "revocation_delay_s": delay}

    @app.put("/v1/models/{model}/measurements", openapi_extra=bodies.MEASUREMENTS_BODY)
    async def put_measurements(model: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, obj = await signed(request)
        ks.set_model_measurements(caller, model, check_measurements(obj.get("measurements")))
        return {"v": wire.VERSION, "model": model}

    @app.put("/v1/models/{model}/grants/{user}")
    async def grant(model: str, user: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, _ = await signed(request)
        ks.set_grant(caller, model, check_identifier(user, "user"), True)
        return {"v": wire.VERSION, "model": model, "user": user, "granted": True}

    @app.delete("/v1/models/{model}/grants/{user}")
    async def revoke(model: str, user: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, _ = await signed(request)
        ks.set_grant(caller, model, check_identifier(user, "user"), False)
        return {"v": wire.VERSION, "model": model, "user": user, "granted": False}

    @app.put("/v1/models/{model}/request-key", openapi_extra=bodies.REQUEST_KEY)
    async def put_request_key(model: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, obj = await signed(request)
        measurements = check_measurements(obj.get("measurements"))
        max_delay = (
            check_delay(obj["max_revocation_delay_s"], "max_revocation_delay_s")
            if obj.get("max_revocation_delay_s") is not None
            else None
        )
        ks.put_request_key(caller, model, decode_field(obj, "sealed_request_key"), measurements, max_delay)
        return {"v": wire.VERSION, "model": model, "user": caller}

    @app.delete("/v1/models/{model}/request-key")
    async def delete_request_key(model: str, request: Request) -> dict:
        check_identifier(model, "model")
        caller, _ = await signed(request)
        ks.delete_request_key(caller, model)
        return {"v": wire.VERSION, "model": model, "deleted": True}

    @app.post("/v1/attest/challenge")
    async def challenge() -> dict:
        return {"v": wire.VERSION, "challenge": b64e(ks.challenge())}

    @app.post("/v1/attest", openapi_extra=bodies.ATTEST)
    async def attest(request: Request) -> dict:
        obj = parse_json_object(await read_body(request, wire.MAX_BODY))
        _version(obj)
        token, session = ks.attest(
            decode_field(obj, "challenge"), decode_field(obj, "public_key"), Evidence.from_json(obj.get("evidence"))
        )
        return {
            "v": wire.VERSION,
            "session": token,
            "expires_at": session.expires,
            "measurement": session.report.measurement,
        }

    @app.post("/v1/release", openapi_extra=bodies.RELEASE)
    async def release(request: Request) -> dict:
        obj = parse_json_object(await read_body(request, wire.MAX_BODY))
        _version(obj)
        token = obj.get("session")
        if not isinstance(token, str) or len(token) != 64:
            raise BadRequest("session: must be the 64-character token from /v1/attest", code="malformed")
        return ks.release(token, check_identifier(obj.get("model"), "model"), check_identifier(obj.get("user"), "user"))

    return app
