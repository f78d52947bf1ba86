"""Clients of the KeyService: principals (owners, users) and runtimes.

A principal client first verifies the KeyService's evidence against the measurement it expects
and pins the attested HPKE key; it sends no secret before that. A runtime client attests once
(ephemeral X25519 key bound into its evidence) and then asks for key releases on that session.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from veil.attest.errors import AttestationError, PolicyError
from veil.attest.evidence import Evidence
from veil.attest.providers import EvidenceProvider
from veil.attest.validate import Policy, validate
from veil.attest.verify import TrustConfig, verify
from veil.crypto import hpke
from veil.crypto.encoding import b64d, b64e
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.identity import Identity, SignedHeaders, verify_signature
from veil.crypto.keys import SymmetricKey
from veil.errors import Unavailable, VeilError
from veil.keyservice import wire

log = logging.getLogger("veil.keyservice.client")


def _raise_for(status: int, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    if 200 <= status < 300 and isinstance(body, dict):
        return body
    err = body.get("error", {}) if isinstance(body, dict) else {}
    raise VeilError(
        err.get("message", f"KeyService answered HTTP {status}"),
        code=err.get("code", "keyservice_error"),
        status=status,
    )


class _Http:
    """Keep-alive HTTP/1.1 to the KeyService on the standard library, one connection per thread.

    Deliberately not httpx: this module is part of the runtime's measured code and its import
    time is part of every cold start (httpx pulls in its CLI's dependencies).
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"KeyService URL must be http(s)://host[:port], got {base_url!r}")
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self._timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _send(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None) -> dict:
        status, _, raw = self._exchange(method, path, body=body, headers=headers)
        return _raise_for(status, raw)

    def _exchange(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, raw body) of one request, without interpreting the answer."""
        for attempt in (0, 1):  # a kept-alive connection the server closed is retried once
            conn = self._connection()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers or {})
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                stale = isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError)
                if attempt == 0 and stale:
                    continue
                raise Unavailable(
                    f"KeyService at {self.base_url} unreachable: {type(exc).__name__}", code="keyservice_unavailable"
                ) from None
            if response.will_close:
                self._drop_connection()
            return response.status, response.headers, raw
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_connection()


class KeyServiceNotTrusted(VeilError):
    """The KeyService's evidence does not satisfy this principal's trust anchors; `field` names
    what failed (measurement, kind, report_data, a certificate...). Nothing secret was sent."""

    code, status = "keyservice_not_trusted", 403

    def __init__(self, cause: AttestationError) -> None:
        super().__init__(f"the KeyService's attestation does not satisfy your trust anchors: {cause}")
        self.field = getattr(cause, "field", "evidence")


class PrincipalClient(_Http):
    """An owner's or user's connection to an attested KeyService.

    `connect` verifies the KeyService's evidence against the measurements this principal expects
    (its own client configuration, never the operator's) and pins the attested HPKE key and
    answer-signing key. Every signed request's answer must carry a valid signature by the pinned
    key over that very request; anything else (a dropped, forged or swapped answer) raises."""

    def __init__(
        self,
        base_url: str,
        identity: Identity,
        *,
        expected_measurements: set[str],
        trust: TrustConfig,
        allow_simulated: bool = False,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(base_url, timeout)
        self.identity = identity
        self._policy = Policy(allowed_measurements=frozenset(expected_measurements), allow_simulated=allow_simulated)
        self._trust = trust
        self._pinned: bytes | None = None
        self._signing_key: bytes | None = None
        self._call_lock = threading.Lock()

    def connect(self) -> bytes:
        """Verify the KeyService's evidence (fresh nonce) and pin its HPKE and signing keys."""
        nonce = os.urandom(32)
        body = self._send("GET", f"/v1/evidence?nonce={b64e(nonce)}")
        public_key = b64d(body.get("public_key"), "public_key")
        signing_key = b64d(body.get("signing_key"), "signing_key")
        if len(signing_key) != 32:
            raise VeilError("signing_key: must be a 32-byte Ed25519 key", code="keyservice_error", status=502)
        evidence = Evidence.from_json(body.get("evidence"))
        try:
            if evidence.kind == "sim" and not self._policy.allow_simulated:
                raise PolicyError("kind", "simulated evidence, and your trust anchors do not accept simulation")
            report = verify(evidence, self._trust)
            validate(report, self._policy, wire.keyservice_binding(public_key, signing_key, nonce))
        except AttestationError as exc:
            raise KeyServiceNotTrusted(exc) from None
        self._pinned, self._signing_key = public_key, signing_key
        return public_key

    def _pinned_key(self) -> bytes:
        return self._pinned if self._pinned is not None else self.connect()

    def _signed(self, method: str, path: str, obj: dict | None = None) -> dict:
        """Send one signed request and return its answer only if the KeyService signed it.

        Requests of one client are serialised, so their sequence numbers arrive in order; a
        request refused as `stale_sequence` (another process of this principal got a later
        number in first) changed nothing and is re-signed once."""
        self._pinned_key()
        body = json.dumps({"v": wire.VERSION, **obj}).encode() if obj is not None else b""
        with self._call_lock:
            for attempt in (0, 1):
                signed = self.identity.sign_request(method, path, body)
                headers = {**signed.as_dict(), "content-type": "application/json"}
                status, answer_headers, raw = self._exchange(method, path, body=body, headers=headers)
                self._verify_answer(signed, method, path, body, status, answer_headers, raw)
                try:
                    return _raise_for(status, raw)
                except VeilError as exc:
                    if exc.code == "stale_sequence" and attempt == 0:
                        continue
                    raise
        raise AssertionError("unreachable")

    def _verify_answer(
        self,
        signed: SignedHeaders,
        method: str,
        path: str,
        body: bytes,
        status: int,
        headers: http.client.HTTPMessage,
        raw: bytes,
    ) -> None:
        assert self._signing_key is not None
        signature = headers.get(wire.HEADER_ANSWER_SIGNATURE)
        payload = wire.answer_payload(
            signed.principal,
            signed.nonce,
            str(signed.seq),
            method,
            path,
            hashlib.sha256(body).hexdigest(),
            status,
            raw,
        )
        try:
            if not signature:
                raise IntegrityError("missing")
            verify_signature(self._signing_key, payload, b64d(signature, wire.HEADER_ANSWER_SIGNATURE))
        except (IntegrityError, MalformedError):
            raise VeilError(
                f"the KeyService's answer to {method} {path} is not signed by the attested KeyService "
                f"(HTTP {status}): it was forged, altered or replaced on the way; the request may or may "
                "not have taken effect",
                code="answer_unauthenticated",
                status=502,
            ) from None

    def register(self) -> str:
        self._signed("POST", "/v1/principals", {"public_key": b64e(self.identity.public_key)})
        return self.identity.id

    def stage_version(
        self,
        model: str,
        key: SymmetricKey,
        digest: str,
        *,
        measurements: list[str] | None = None,
        revocation_delay_s: int | None = None,
    ) -> int:
        """Stage a new version of `model` under `key`; returns the version number to seal with."""
        sealed = hpke.seal(
            self._pinned_key(),
            key.material(),
            info=wire.INFO_MODEL_KEY_UPLOAD,
            aad=wire.upload_aad(model, self.identity.id),
        )
        obj: dict[str, Any] = {"sealed_model_key": b64e(sealed), "digest": digest}
        if measurements is not None:
            obj["measurements"] = measurements
        if revocation_delay_s is not None:
            obj["revocation_delay_s"] = revocation_delay_s
        answer = self._signed("POST", f"/v1/models/{model}/versions", obj)
        version = answer.get("version")
        if type(version) is not int or answer.get("model") != model:
            raise VeilError("stage answer: bad version", code="keyservice_error", status=502)
        return version

    def commit_version(self, model: str, version: int) -> dict:
        """Make a staged version current (after its sealed file is in the store)."""
        return self._signed("POST", f"/v1/models/{model}/versions/{version}/commit", {})

    def put_model_key(
        self,
        model: str,
        key: SymmetricKey,
        measurements: list[str] | None = None,
        *,
        digest: str | None = None,
        revocation_delay_s: int | None = None,
    ) -> int:
        """Stage and commit a version in one go (tools and tests that manage the store themselves)."""
        version = self.stage_version(
            model,
            key,
            digest or hashlib.sha256(b"").hexdigest(),
            measurements=measurements,
            revocation_delay_s=revocation_delay_s,
        )
        self.commit_version(model, version)
        return version

    def put_card(self, model: str, version: int, signed_card: dict[str, Any]) -> None:
        self._signed("PUT", f"/v1/models/{model}/versions/{version}/card", {"signed_card": signed_card})

    def model_info(self, model: str) -> dict[str, Any]:
        """Owner, owner key and current version, over the signed channel."""
        return self._signed("GET", f"/v1/models/{model}")

    def set_measurements(self, model: str, measurements: list[str]) -> None:
        self._signed("PUT", f"/v1/models/{model}/measurements", {"measurements": measurements})

    def set_revocation_delay(self, model: str, seconds: int) -> None:
        self._signed("PUT", f"/v1/models/{model}/revocation-delay", {"revocation_delay_s": seconds})

    def grant(self, model: str, user_id: str) -> None:
        self._signed("PUT", f"/v1/models/{model}/grants/{user_id}")

    def revoke(self, model: str, user_id: str) -> None:
        self._signed("DELETE", f"/v1/models/{model}/grants/{user_id}")

    def put_request_key(
        self, model: str, key: SymmetricKey, measurements: list[str], *, max_revocation_delay_s: int | None = None
    ) -> None:
        sealed = hpke.seal(
            self._pinned_key(),
            key.material(),
            info=wire.INFO_REQUEST_KEY_UPLOAD,
            aad=wire.upload_aad(model, self.identity.id),
        )
        obj: dict[str, Any] = {"sealed_request_key": b64e(sealed), "measurements": measurements}
        if max_revocation_delay_s is not None:
            obj["max_revocation_delay_s"] = max_revocation_delay_s
        self._signed("PUT", f"/v1/models/{model}/request-key", obj)

    def delete_request_key(self, model: str) -> None:
        self._signed("DELETE", f"/v1/models/{model}/request-key")


@dataclass(frozen=True)
class Release:
    """What one key release gives a runtime: both keys, the model version they belong to (and its
    content digest, which the sealed file's header must carry), and how long it may cache them."""

    model_key: SymmetricKey
    request_key: SymmetricKey
    version: int
    digest: str
    ttl_s: float


def _release_terms(answer: dict[str, Any]) -> tuple[int, str, int]:
    version, digest, ttl = answer.get("model_version"), answer.get("model_digest"), answer.get("ttl_s")
    if type(version) is not int or version < 1:
        raise VeilError("release.model_version: must be a positive integer", code="keyservice_error", status=502)
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise VeilError("release.model_digest: must be 64 lowercase hex digits", code="keyservice_error", status=502)
    if type(ttl) is not int or ttl < 0:
        raise VeilError("release.ttl_s: must be a non-negative integer", code="keyservice_error", status=502)
    return version, digest, ttl


class RuntimeKeyClient(_Http):
    """A runtime instance's attested session with the KeyService (attest once, release many)."""

    def __init__(self, base_url: str, provider: EvidenceProvider, *, timeout: float = 10.0) -> None:
        super().__init__(base_url, timeout)
        self._provider = provider
        self._keypair = hpke.HpkeKeyPair.generate()
        self._session: str | None = None
        self._lock = threading.Lock()
        self.measurement: str | None = None

    def attest(self) -> str:
        """Fetch a challenge, produce evidence binding our ephemeral key to it, open a session."""
        challenge = b64d(self._send("POST", "/v1/attest/challenge").get("challenge"), "challenge")
        evidence = self._provider.get_evidence(wire.runtime_binding(self._keypair.public_key, challenge))
        body = json.dumps(
            {
                "v": wire.VERSION,
                "challenge": b64e(challenge),
                "public_key": b64e(self._keypair.public_key),
                "evidence": evidence.to_json(),
            }
        ).encode()
        answer = self._send("POST", "/v1/attest", body=body, headers={"content-type": "application/json"})
        self._session = answer["session"]
        self.measurement = answer.get("measurement")
        return self._session

    def _session_token(self) -> str:
        with self._lock:
            return self._session if self._session is not None else self.attest()

    def release(self, model: str, user: str) -> Release:
        """Keys for `user` on `model` and their terms; re-attests once if the session lapsed."""
        for attempt in (0, 1):
            token = self._session_token()
            body = json.dumps({"v": wire.VERSION, "session": token, "model": model, "user": user}).encode()
            try:
                answer = self._send("POST", "/v1/release", body=body, headers={"content-type": "application/json"})
            except VeilError as exc:
                if exc.code == "no_session" and attempt == 0:
                    with self._lock:
                        self._session = None
                    continue
                raise
            version, digest, ttl_s = _release_terms(answer)
            aad = wire.release_aad(token, model, user, version, digest, ttl_s)
            model_key = self._keypair.open(
                b64d(answer.get("model_key"), "model_key"), info=wire.INFO_RELEASE_MODEL_KEY, aad=aad
            )
            request_key = self._keypair.open(
                b64d(answer.get("request_key"), "request_key"), info=wire.INFO_RELEASE_REQUEST_KEY, aad=aad
            )
            ttl = min(float(ttl_s), float(wire.MAX_REVOCATION_DELAY_S))  # measured cap, whatever the answer says
            return Release(SymmetricKey(model_key), SymmetricKey(request_key), version, digest, ttl)
        raise AssertionError("unreachable")
