"""Clients of the KeyService: principals (owners, users) and runtimes.

A principal client first verifies the KeyService's evidence against the measurement it expects
and pins the attested HPKE key; it sends no secret before that. A runtime client attests once
(ephemeral X25519 key bound into its evidence) and then asks for key releases on that session.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import urllib.parse
from typing import Any

from veil.attest.evidence import Evidence
from veil.attest.providers import EvidenceProvider
from veil.attest.validate import Policy, validate
from veil.attest.verify import TrustConfig, verify
from veil.crypto import hpke
from veil.crypto.encoding import b64d, b64e
from veil.crypto.identity import Identity
from veil.crypto.keys import SymmetricKey
from veil.errors import Unavailable, VeilError
from veil.keyservice import wire

log = logging.getLogger("veil.keyservice.client")


def _raise_for(status: int, raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
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
            return _raise_for(response.status, raw)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_connection()


class PrincipalClient(_Http):
    """An owner's or user's connection to an attested KeyService."""

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

    def connect(self) -> bytes:
        """Verify the KeyService's evidence (fresh nonce) and pin its HPKE public key."""
        nonce = os.urandom(32)
        body = self._send("GET", f"/v1/evidence?nonce={b64e(nonce)}")
        public_key = b64d(body.get("public_key"), "public_key")
        report = verify(Evidence.from_json(body.get("evidence")), self._trust)
        validate(report, self._policy, wire.keyservice_binding(public_key, nonce))
        self._pinned = public_key
        return public_key

    def _pinned_key(self) -> bytes:
        return self._pinned if self._pinned is not None else self.connect()

    def _signed(self, method: str, path: str, obj: dict | None = None) -> dict:
        body = json.dumps({"v": wire.VERSION, **obj}).encode() if obj is not None else b""
        headers = self.identity.sign_request(method, path, body).as_dict()
        headers["content-type"] = "application/json"
        return self._send(method, path, body=body, headers=headers)

    def register(self) -> str:
        self._signed("POST", "/v1/principals", {"public_key": b64e(self.identity.public_key)})
        return self.identity.id

    def put_model_key(self, model: str, key: SymmetricKey, measurements: list[str] | None = None) -> None:
        sealed = hpke.seal(
            self._pinned_key(),
            key.material(),
            info=wire.INFO_MODEL_KEY_UPLOAD,
            aad=wire.upload_aad(model, self.identity.id),
        )
        obj: dict[str, Any] = {"sealed_model_key": b64e(sealed)}
        if measurements is not None:
            obj["measurements"] = measurements
        self._signed("PUT", f"/v1/models/{model}/key", obj)

    def set_measurements(self, model: str, measurements: list[str]) -> None:
        self._signed("PUT", f"/v1/models/{model}/measurements", {"measurements": measurements})

    def grant(self, model: str, user_id: str) -> None:
        self._signed("PUT", f"/v1/models/{model}/grants/{user_id}")

    def revoke(self, model: str, user_id: str) -> None:
        self._signed("DELETE", f"/v1/models/{model}/grants/{user_id}")

    def put_request_key(self, model: str, key: SymmetricKey, measurements: list[str]) -> None:
        sealed = hpke.seal(
            self._pinned_key(),
            key.material(),
            info=wire.INFO_REQUEST_KEY_UPLOAD,
            aad=wire.upload_aad(model, self.identity.id),
        )
        self._signed(
            "PUT", f"/v1/models/{model}/request-key", {"sealed_request_key": b64e(sealed), "measurements": measurements}
        )

    def delete_request_key(self, model: str) -> None:
        self._signed("DELETE", f"/v1/models/{model}/request-key")


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

    def release(self, model: str, user: str) -> tuple[SymmetricKey, SymmetricKey]:
        """(model key, request key) for `user` on `model`; re-attests once if the session lapsed."""
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
            aad = wire.release_aad(token, model, user)
            model_key = self._keypair.open(
                b64d(answer.get("model_key"), "model_key"), info=wire.INFO_RELEASE_MODEL_KEY, aad=aad
            )
            request_key = self._keypair.open(
                b64d(answer.get("request_key"), "request_key"), info=wire.INFO_RELEASE_REQUEST_KEY, aad=aad
            )
            return SymmetricKey(model_key), SymmetricKey(request_key)
        raise AssertionError("unreachable")
