"""KeyService logic, independent of HTTP: authentication, policy changes, attestation, release.

Every state change and every release or refusal is appended to the hash-chained audit log in
the same transaction as the change it records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from veil.attest.errors import AttestationError, PolicyError
from veil.attest.evidence import Evidence, VerifiedReport
from veil.attest.providers import EvidenceProvider
from veil.attest.validate import Policy, parse_entry, validate
from veil.attest.verify import TrustConfig, verify
from veil.crypto import hpke
from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import check_identifier
from veil.crypto.errors import CryptoError, MalformedError
from veil.crypto.identity import SignedHeaders, principal_id, signing_payload, verify_signature
from veil.errors import BadRequest, Busy, Forbidden, NotFound, Unauthorized
from veil.keyservice import wire
from veil.keyservice.policy import ReleaseFacts, release_refusal
from veil.keyservice.store import Store

log = logging.getLogger("veil.keyservice")
MAX_MEASUREMENTS = 64


@dataclass(frozen=True)
class Session:
    """An attested runtime: its ephemeral public key and what its evidence proved."""

    public_key: bytes
    report: VerifiedReport
    expires: float


def check_measurements(value: object, field: str = "measurements") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(m, str) and 0 < len(m) <= 512 for m in value):
        raise BadRequest(f"{field}: must be a list of non-empty strings (≤ 512 chars)", code="malformed")
    if len(value) > MAX_MEASUREMENTS:
        raise BadRequest(f"{field}: at most {MAX_MEASUREMENTS} entries", code="malformed")
    for entry in value:
        try:
            parse_entry(entry)  # a typo would otherwise silently never match
        except ValueError as exc:
            raise BadRequest(f"{field}: {exc}", code="malformed") from None
    return sorted(set(value))


def _token_key(token: str) -> str:
    """Sessions are looked up by a hash of the bearer token, not the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class KeyService:
    """The trusted key broker. Holds its HPKE key pair only in memory (sealed at rest)."""

    def __init__(
        self,
        store: Store,
        provider: EvidenceProvider,
        trust: TrustConfig,
        runtime_policy: Policy,
        *,
        session_ttl_s: float = wire.SESSION_TTL_S,
    ) -> None:
        self.store = store
        self.provider = provider
        self.trust = trust
        self.runtime_policy = runtime_policy
        self.session_ttl_s = session_ttl_s
        self.keypair = hpke.HpkeKeyPair.from_private_bytes(
            store.service_secret("hpke_private_key", lambda: hpke.HpkeKeyPair.generate().private_bytes())
        )
        self._sessions: dict[str, Session] = {}
        self._challenges: dict[bytes, float] = {}
        self._lock = threading.Lock()
        if runtime_policy.allow_simulated:
            log.warning("KeyService accepts SIMULATED runtime attestation (allow_simulated=true): not for production")

    # -- the KeyService's own evidence -------------------------------------------------------
    def evidence(self, client_nonce: bytes) -> dict:
        if not 16 <= len(client_nonce) <= 64:
            raise BadRequest("nonce: must be 16-64 bytes", code="malformed")
        ev = self.provider.get_evidence(wire.keyservice_binding(self.keypair.public_key, client_nonce))
        return {"v": wire.VERSION, "public_key": b64e(self.keypair.public_key), "evidence": ev.to_json()}

    # -- authentication ----------------------------------------------------------------------
    def authenticate(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str], *, registering_key: bytes | None = None
    ) -> str:
        """Return the principal id that signed this request, or raise Unauthorized."""
        try:
            signed = SignedHeaders.from_headers(headers)
        except MalformedError as exc:
            raise Unauthorized(str(exc), code="bad_signature_headers") from None
        if abs(time.time() - signed.timestamp) > wire.CLOCK_SKEW_S:
            raise Unauthorized(
                f"timestamp outside ±{wire.CLOCK_SKEW_S} s of the KeyService clock", code="stale_timestamp"
            )
        if registering_key is not None:
            if principal_id(registering_key) != signed.principal:
                raise Unauthorized("principal id is not SHA-256 of the registered public key", code="bad_principal")
            public_key = registering_key
        else:
            found = self.store.principal_key(signed.principal)
            if found is None:
                raise Unauthorized("unknown principal: register first", code="unknown_principal")
            public_key = found
        try:
            verify_signature(
                public_key, signing_payload(method, path, body, signed.timestamp, signed.nonce), signed.signature
            )
        except CryptoError:
            raise Unauthorized("request signature does not verify", code="bad_signature") from None
        if not self.store.use_nonce(signed.principal, signed.nonce, wire.CLOCK_SKEW_S):
            raise Unauthorized("request nonce was already used (replay)", code="replay")
        return signed.principal

    # -- principals ----------------------------------------------------------------------------
    def register(self, pid: str, public_key: bytes) -> bool:
        with self.store.transaction() as db:
            created = self.store.add_principal(db, pid, public_key)
            self.store.append_audit(db, {"actor": pid, "action": "register", "outcome": "allowed", "new": created})
        return created

    # -- owner operations ------------------------------------------------------------------------
    def _owned_model(self, caller: str, model_id: str):
        record = self.store.model(model_id)
        if record is None:
            raise NotFound(f"model {model_id!r} is not registered", code="unknown_model")
        if record.owner_id != caller:
            self.store.audit(
                {
                    "actor": caller,
                    "action": "owner_op",
                    "subject": model_id,
                    "outcome": "refused",
                    "reason": "not the owner",
                }
            )
            raise Forbidden(f"only the owner of model {model_id!r} may change it", code="not_owner")
        return record

    def put_model_key(self, caller: str, model_id: str, sealed_key: bytes, measurements: list[str] | None) -> None:
        check_identifier(model_id, "model")
        record = self.store.model(model_id)
        if record is not None and record.owner_id != caller:
            self._owned_model(caller, model_id)
        key = self._open_upload(sealed_key, wire.INFO_MODEL_KEY_UPLOAD, model_id, caller, "sealed_model_key")
        with self.store.transaction() as db:
            # Re-checked inside the write transaction: two principals racing to create the same model
            # id must not let the second overwrite the first's key.
            if not self.store.put_model_key(db, model_id, caller, key):
                raise Forbidden(f"only the owner of model {model_id!r} may change it", code="not_owner")
            if measurements is not None:
                self.store.set_model_measurements(db, model_id, measurements)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "put_model_key",
                    "subject": model_id,
                    "outcome": "allowed",
                    "measurements": measurements,
                },
            )

    def set_model_measurements(self, caller: str, model_id: str, measurements: list[str]) -> None:
        self._owned_model(caller, model_id)
        with self.store.transaction() as db:
            self.store.set_model_measurements(db, model_id, measurements)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "set_measurements",
                    "subject": model_id,
                    "outcome": "allowed",
                    "measurements": measurements,
                },
            )

    def set_grant(self, caller: str, model_id: str, user_id: str, granted: bool) -> None:
        self._owned_model(caller, model_id)
        if self.store.principal_key(user_id) is None:
            raise NotFound(f"user {user_id!r} is not a registered principal", code="unknown_principal")
        with self.store.transaction() as db:
            self.store.set_grant(db, model_id, user_id, granted)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "grant" if granted else "revoke",
                    "subject": f"{model_id}/{user_id}",
                    "outcome": "allowed",
                },
            )

    # -- user operations -------------------------------------------------------------------------
    def put_request_key(self, caller: str, model_id: str, sealed_key: bytes, measurements: list[str]) -> None:
        if self.store.model(model_id) is None:
            raise NotFound(f"model {model_id!r} is not registered", code="unknown_model")
        key = self._open_upload(sealed_key, wire.INFO_REQUEST_KEY_UPLOAD, model_id, caller, "sealed_request_key")
        with self.store.transaction() as db:
            self.store.put_request_key(db, model_id, caller, key, measurements)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "put_request_key",
                    "subject": model_id,
                    "outcome": "allowed",
                    "measurements": measurements,
                },
            )

    def delete_request_key(self, caller: str, model_id: str) -> None:
        with self.store.transaction() as db:
            if not self.store.delete_request_key(db, model_id, caller):
                raise NotFound(f"no request key for model {model_id!r}", code="no_request_key")
            self.store.append_audit(
                db, {"actor": caller, "action": "delete_request_key", "subject": model_id, "outcome": "allowed"}
            )

    def _open_upload(self, sealed: bytes, info: bytes, model_id: str, caller: str, field: str) -> bytes:
        try:
            key = self.keypair.open(sealed, info=info, aad=wire.upload_aad(model_id, caller))
        except CryptoError:
            raise BadRequest(
                f"{field}: does not open with the KeyService key for this model and principal", code="integrity"
            ) from None
        if len(key) != 32:
            raise BadRequest(f"{field}: key must be 32 bytes", code="malformed")
        return key

    # -- runtime attestation and release -------------------------------------------------------
    def challenge(self) -> bytes:
        now = time.time()
        value = os.urandom(32)
        with self._lock:
            for c, exp in list(self._challenges.items()):
                if exp < now:
                    del self._challenges[c]
            if len(self._challenges) > 10_000:
                raise Busy("too many outstanding attestation challenges; retry shortly")
            self._challenges[value] = now + wire.CHALLENGE_TTL_S
        return value

    def attest(self, challenge: bytes, public_key: bytes, evidence: Evidence) -> tuple[str, Session]:
        """Verify and validate a runtime's evidence; open an attested session for its key."""
        with self._lock:
            expires = self._challenges.pop(challenge, None)
        if expires is None or expires < time.time():
            raise Unauthorized("challenge unknown, used or expired: fetch a new one", code="bad_challenge")
        if len(public_key) != hpke.PUBLIC_KEY_BYTES:
            raise BadRequest("public_key: must be a 32-byte X25519 key", code="malformed")
        try:
            if evidence.kind == "sim" and not self.runtime_policy.allow_simulated:
                # Say so plainly instead of "no simulation root trusted" from the verifier.
                raise PolicyError("kind", "simulated attestation is not allowed by this KeyService", actual="sim")
            report = verify(evidence, self.trust, datetime.now(UTC))
            validate(report, self.runtime_policy, wire.runtime_binding(public_key, challenge))
        except AttestationError as exc:
            self.store.audit(
                {
                    "actor": "runtime",
                    "action": "attest",
                    "kind": evidence.kind,
                    "outcome": "refused",
                    "reason": str(exc),
                }
            )
            raise
        token = os.urandom(32).hex()
        session = Session(public_key, report, time.time() + self.session_ttl_s)
        with self._lock:
            now = time.time()
            for k, s in list(self._sessions.items()):
                if s.expires < now:
                    del self._sessions[k]
            self._sessions[_token_key(token)] = session
        self.store.audit(
            {
                "actor": "runtime",
                "action": "attest",
                "kind": report.kind,
                "measurement": report.measurement,
                "tcb_status": report.tcb_status,
                "outcome": "allowed",
            }
        )
        return token, session

    def release(self, token: str, model_id: str, user_id: str) -> dict:
        """Release the model key and the user's request key, sealed to the session's key."""
        with self._lock:
            session = self._sessions.get(_token_key(token))
        if session is None or session.expires < time.time():
            raise Unauthorized(
                "no attested session for this token (expired or unknown): attest again", code="no_session"
            )
        model = self.store.model(model_id)
        granted = model is not None and self.store.is_granted(model_id, user_id)
        request = self.store.request_key(model_id, user_id) if granted else None
        facts = ReleaseFacts(
            model_exists=model is not None,
            model_has_key=bool(model and model.has_key),
            owner_measurements=model.measurements if model else [],
            granted=granted,
            has_request_key=request is not None,
            user_measurements=request[1] if request else [],
        )
        refusal = release_refusal(session.report, facts)
        audit = {
            "actor": "runtime",
            "action": "release",
            "subject": f"{model_id}/{user_id}",
            "measurement": session.report.measurement,
        }
        if refusal is not None:
            code, reason = refusal
            self.store.audit({**audit, "outcome": "refused", "reason": reason})
            if code == "unknown_model":
                raise NotFound(f"model {model_id!r}: {reason}", code=code)
            raise Forbidden(f"key release refused for {model_id}/{user_id}: {reason}", code=code)
        model_key = self.store.model_key(model_id)
        assert model_key is not None and request is not None
        aad = wire.release_aad(token, model_id, user_id)
        body = {
            "v": wire.VERSION,
            "model_key": b64e(hpke.seal(session.public_key, model_key, info=wire.INFO_RELEASE_MODEL_KEY, aad=aad)),
            "request_key": b64e(hpke.seal(session.public_key, request[0], info=wire.INFO_RELEASE_REQUEST_KEY, aad=aad)),
            "ttl_s": wire.KEY_CACHE_TTL_S,
        }
        self.store.audit({**audit, "outcome": "allowed"})
        return body


def decode_field(obj: dict, name: str) -> bytes:
    """Base64url field of a request body, with the field named in the error."""
    if name not in obj:
        raise BadRequest(f"{name}: missing", code="malformed")
    return b64d(obj[name], name)
