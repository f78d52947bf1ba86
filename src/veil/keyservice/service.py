"""KeyService logic, independent of HTTP: authentication, policy changes, attestation, release.

Every state change and every release or refusal is appended to the hash-chained audit log in
the same transaction as the change it records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.envelope import check_identifier
from veil.crypto.errors import CryptoError, MalformedError
from veil.crypto.identity import Identity, SignedHeaders, principal_id, signing_payload, verify_signature
from veil.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, VeilError
from veil.keyservice import wire
from veil.keyservice.policy import ReleaseFacts, release_refusal
from veil.keyservice.store import Store
from veil.wire import cards

log = logging.getLogger("veil.keyservice")
MAX_MEASUREMENTS = 64
_DIGEST_CHARS = frozenset("0123456789abcdef")


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


def check_delay(value: object, field: str = "revocation_delay_s") -> int:
    """A revocation delay: whole seconds in [0, MAX_REVOCATION_DELAY_S] (0: runtimes never cache)."""
    if type(value) is not int or not 0 <= value <= wire.MAX_REVOCATION_DELAY_S:
        raise BadRequest(f"{field}: must be an integer in [0, {wire.MAX_REVOCATION_DELAY_S}] seconds", code="malformed")
    return value


def check_digest(value: object, field: str = "digest") -> str:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _DIGEST_CHARS:
        raise BadRequest(f"{field}: must be 64 lowercase hex characters", code="malformed")
    return value


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
        # Signs every answer to a principal; bound into the evidence beside the HPKE key.
        self.signer = Identity.from_private_bytes(
            store.service_secret("answer_signing_key", lambda: Identity.generate().to_private_bytes())
        )
        self._sessions: dict[str, Session] = {}
        self._challenge_key = os.urandom(32)
        self._used_challenges: dict[bytes, float] = {}
        self._lock = threading.Lock()
        if runtime_policy.allow_simulated:
            log.warning("KeyService accepts SIMULATED runtime attestation (allow_simulated=true): not for production")

    # -- the KeyService's own evidence -------------------------------------------------------
    def evidence(self, client_nonce: bytes) -> dict:
        if not 16 <= len(client_nonce) <= 64:
            raise BadRequest("nonce: must be 16-64 bytes", code="malformed")
        ev = self.provider.get_evidence(
            wire.keyservice_binding(self.keypair.public_key, self.signer.public_key, client_nonce)
        )
        return {
            "v": wire.VERSION,
            "public_key": b64e(self.keypair.public_key),
            "signing_key": b64e(self.signer.public_key),
            "evidence": ev.to_json(),
        }

    def sign_answer(self, payload: bytes) -> bytes:
        """Sign one answer to a principal (`wire.answer_payload`)."""
        return self.signer.sign(payload)

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
                public_key,
                signing_payload(method, path, body, signed.timestamp, signed.nonce, signed.seq),
                signed.signature,
            )
        except CryptoError:
            raise Unauthorized("request signature does not verify", code="bad_signature") from None
        if not self.store.advance_seq(signed.principal, signed.seq):
            raise Unauthorized(
                "request sequence number is not above the last one accepted from this principal "
                "(replayed or held back)",
                code="stale_sequence",
            )
        return signed.principal

    # -- principals ----------------------------------------------------------------------------
    def register(self, pid: str, public_key: bytes) -> bool:
        with self.store.transaction() as db:
            created = self.store.add_principal(db, pid, public_key)
            self.store.append_audit(db, {"actor": pid, "action": "register", "outcome": "allowed", "new": created})
        return created

    # -- owner operations ------------------------------------------------------------------------
    def _registered_model(self, model_id: str):
        """The model's record, or `unknown_model` naming the id (checked against the id rule first)."""
        record = self.store.model(check_identifier(model_id, "model"))
        if record is None:
            raise NotFound(f"model {model_id!r} is not registered", code="unknown_model")
        return record

    def _owned_model(self, caller: str, model_id: str):
        record = self._registered_model(model_id)
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

    def stage_version(
        self,
        caller: str,
        model_id: str,
        digest: str,
        sealed_key: bytes,
        measurements: list[str] | None,
        revocation_delay_s: int | None,
    ) -> int:
        """Stage a new version of `model_id` (creating the model for `caller` if it is new).

        Nothing serves it until `commit_version`; its allow-list and delay apply at commit, so a
        publish refused here or failing later leaves the current version serving unchanged."""
        check_identifier(model_id, "model")
        if model_id.startswith(wire.RESERVED_MODEL_PREFIX):
            raise BadRequest(
                f"model id {model_id!r}: ids starting with {wire.RESERVED_MODEL_PREFIX!r} name evaluation keys in the "
                "model store and cannot be models",
                code="reserved_model_id",
            )
        check_digest(digest)
        record = self.store.model(model_id)
        if record is not None and record.owner_id != caller:
            self._owned_model(caller, model_id)
        key = self._open_upload(sealed_key, wire.INFO_MODEL_KEY_UPLOAD, model_id, caller, "sealed_model_key")
        with self.store.transaction() as db:
            # Re-checked inside the write transaction: two principals racing to create the same model
            # id must not let the second take it over.
            created = self.store.create_model(
                db,
                model_id,
                caller,
                revocation_delay_s if revocation_delay_s is not None else wire.DEFAULT_REVOCATION_DELAY_S,
            )
            if not created and self.store._model_row(db, model_id).owner_id != caller:
                raise Forbidden(f"only the owner of model {model_id!r} may change it", code="not_owner")
            version = self.store.latest_version_number(db, model_id) + 1
            self.store.stage_version(db, model_id, version, digest, key, measurements, revocation_delay_s)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "stage_version",
                    "subject": f"{model_id}/v{version}",
                    "outcome": "allowed",
                    "measurements": measurements,
                    "revocation_delay_s": revocation_delay_s,
                },
            )
        return version

    def commit_version(self, caller: str, model_id: str, version: int) -> dict:
        """Make a staged version current: the next release of every runtime names it."""
        self._owned_model(caller, model_id)
        found = self.store.version(model_id, version)
        if found is None:
            raise NotFound(f"model {model_id!r} has no version {version}", code="unknown_version")
        if found.state != "staged":
            raise Conflict(f"model {model_id!r} version {version} is {found.state}, not staged", code="not_staged")
        with self.store.transaction() as db:
            current = self.store._model_row(db, model_id)
            if current is not None and current.current_version > version:
                raise Conflict(
                    f"model {model_id!r}: version {current.current_version} is already current (newer than {version})",
                    code="stale_version",
                )
            updated = self.store.commit_version(db, model_id, version)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "commit_version",
                    "subject": f"{model_id}/v{version}",
                    "outcome": "allowed",
                },
            )
        return {"model": model_id, "version": version, "revocation_delay_s": updated.revocation_delay_s}

    def version_info(self, model_id: str, version: int) -> dict:
        """Public facts the untrusted gateway needs to accept an upload: who owns the model (and
        their public key, to check the upload signature) and the version's state. No digest, no key."""
        model = self.store.model(check_identifier(model_id, "model"))
        found = self.store.version(model_id, version) if model is not None else None
        if model is None or found is None:
            raise NotFound(f"model {model_id!r} has no version {version}", code="unknown_version")
        owner_key = self.store.principal_key(model.owner_id)
        return {
            "v": wire.VERSION,
            "model": model_id,
            "version": version,
            "state": found.state,
            "current_version": model.current_version,
            "owner": model.owner_id,
            "owner_public_key": b64e(owner_key or b""),
        }

    def put_card(self, caller: str, model_id: str, version: int, signed: object) -> None:
        """Attach the owner-signed card to a staged version (checked: the caller's signature,
        this model and version, the caller as owner)."""
        self._owned_model(caller, model_id)
        found = self.store.version(model_id, version)
        if found is None:
            raise NotFound(f"model {model_id!r} has no version {version}", code="unknown_version")
        if found.state != "staged":
            raise Conflict(
                f"model {model_id!r} version {version} is {found.state}: cards are set while staged", code="not_staged"
            )
        owner_key = self.store.principal_key(caller)
        assert owner_key is not None
        try:
            card = cards.verify_card(signed, owner_key)
        except MalformedError as exc:
            raise BadRequest(f"card: {exc}", code="bad_card") from None
        if (card.model, card.version) != (model_id, version):
            raise BadRequest(
                f"card: names {card.model!r} v{card.version}, not {model_id!r} v{version}", code="bad_card"
            )
        text = canonical_json(signed).decode()
        if len(text) > cards.MAX_CARD_BYTES:
            raise BadRequest(f"card: larger than {cards.MAX_CARD_BYTES} bytes", code="bad_card")
        with self.store.transaction() as db:
            self.store.set_card(db, model_id, version, text)
            self.store.append_audit(
                db, {"actor": caller, "action": "put_card", "subject": f"{model_id}/v{version}", "outcome": "allowed"}
            )

    def current_card(self, model_id: str) -> dict:
        """The signed card of the current version (public: readers verify the owner's signature)."""
        model = self._registered_model(model_id)
        text = self.store.card(model_id, model.current_version) if model.current_version else None
        if text is None:
            raise NotFound(f"model {model_id!r} has no card for its current version", code="no_card")
        return {"v": wire.VERSION, "version": model.current_version, "signed_card": json.loads(text)}

    def access(self, model_id: str, user_id: str) -> dict:
        """Public: a user's public key and whether the model's owner grants them the model. The
        gateway authenticates HE-mode requests and evaluation-key uploads with it (in HE mode the
        cloud enforces access; in TEE and hybrid mode the KeyService does, at key release)."""
        model = self._registered_model(model_id)
        public_key = self.store.principal_key(check_identifier(user_id, "user"))
        if public_key is None:
            raise NotFound(f"user {user_id!r} is not a registered principal", code="unknown_principal")
        return {
            "v": wire.VERSION,
            "model": model_id,
            "user": user_id,
            "public_key": b64e(public_key),
            "granted": self.store.is_granted(model_id, user_id),
            "revocation_delay_s": model.revocation_delay_s,
        }

    def model_info(self, model_id: str) -> dict:
        """Who owns a model and which version is current (asked over the signed channel, so a
        user can trust the owner key it uses to verify the model's card)."""
        model = self._registered_model(model_id)
        return {
            "v": wire.VERSION,
            "model": model_id,
            "owner": model.owner_id,
            "owner_public_key": b64e(self.store.principal_key(model.owner_id) or b""),
            "current_version": model.current_version,
            "revocation_delay_s": model.revocation_delay_s,
        }

    def set_revocation_delay(self, caller: str, model_id: str, delay: int) -> None:
        self._owned_model(caller, model_id)
        with self.store.transaction() as db:
            self.store.set_revocation_delay(db, model_id, delay)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "set_revocation_delay",
                    "subject": model_id,
                    "outcome": "allowed",
                    "revocation_delay_s": delay,
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
    def put_request_key(
        self,
        caller: str,
        model_id: str,
        sealed_key: bytes,
        measurements: list[str],
        max_revocation_delay_s: int | None = None,
    ) -> None:
        self._registered_model(model_id)
        key = self._open_upload(sealed_key, wire.INFO_REQUEST_KEY_UPLOAD, model_id, caller, "sealed_request_key")
        with self.store.transaction() as db:
            self.store.put_request_key(db, model_id, caller, key, measurements, max_revocation_delay_s)
            self.store.append_audit(
                db,
                {
                    "actor": caller,
                    "action": "put_request_key",
                    "subject": model_id,
                    "outcome": "allowed",
                    "measurements": measurements,
                    "max_revocation_delay_s": max_revocation_delay_s,
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
        """A fresh attestation challenge, kept nowhere: expiry ‖ random ‖ MAC under a key of this
        process. Unauthenticated callers therefore cannot fill any table by asking for them."""
        expires = int(time.time()) + wire.CHALLENGE_TTL_S
        body = expires.to_bytes(6, "big") + os.urandom(10)
        return body + hmac.new(self._challenge_key, body, hashlib.sha256).digest()[:16]

    def _check_challenge(self, challenge: bytes) -> float:
        """Its expiry if `challenge` is ours, unexpired and unused; else Unauthorized."""
        ok = len(challenge) == 32 and hmac.compare_digest(
            hmac.new(self._challenge_key, challenge[:16], hashlib.sha256).digest()[:16], challenge[16:]
        )
        expires = int.from_bytes(challenge[:6], "big") if ok else 0
        now = time.time()
        with self._lock:
            used = challenge in self._used_challenges
        if not ok or expires < now or used:
            raise Unauthorized("challenge unknown, used or expired: fetch a new one", code="bad_challenge")
        return float(expires)

    def _use_challenge(self, challenge: bytes, expires: float) -> None:
        """Mark a challenge used, once its evidence verified (so only real runtimes fill the set)."""
        now = time.time()
        with self._lock:
            for c, exp in list(self._used_challenges.items()):
                if exp < now:
                    del self._used_challenges[c]
            if challenge in self._used_challenges:
                raise Unauthorized("challenge already used: fetch a new one", code="bad_challenge")
            self._used_challenges[challenge] = expires

    def attest(self, challenge: bytes, public_key: bytes, evidence: Evidence) -> tuple[str, Session]:
        """Verify and validate a runtime's evidence; open an attested session for its key."""
        expires = self._check_challenge(challenge)
        if len(public_key) != hpke.PUBLIC_KEY_BYTES:
            raise BadRequest("public_key: must be a 32-byte X25519 key", code="malformed")
        try:
            if evidence.kind == "sim" and not self.runtime_policy.allow_simulated:
                # Say so plainly instead of "no simulation root trusted" from the verifier.
                raise PolicyError("kind", "simulated attestation is not allowed by this KeyService", actual="sim")
            report = verify(evidence, self.trust, datetime.now(UTC))
            validate(report, self.runtime_policy, wire.runtime_binding(public_key, challenge))
        except Exception as exc:
            # Every refusal is audited, whatever raised it; a verifier bug is still a refusal.
            reason = (
                str(exc) if isinstance(exc, AttestationError | VeilError) else f"verifier error ({type(exc).__name__})"
            )
            self.store.audit(
                {
                    "actor": "runtime",
                    "action": "attest",
                    "kind": evidence.kind,
                    "outcome": "refused",
                    "reason": reason,
                }
            )
            if isinstance(exc, AttestationError | VeilError):
                raise
            raise Forbidden("attestation: evidence could not be verified", code="attestation_failed") from None
        self._use_challenge(challenge, expires)
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
        view = self.store.release_view(model_id, user_id)
        model = view.model
        facts = ReleaseFacts(
            model_exists=model is not None,
            model_has_key=view.model_key is not None,
            owner_measurements=model.measurements if model else [],
            granted=view.granted,
            has_request_key=view.request_key is not None,
            user_measurements=view.user_measurements,
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
        assert model is not None and view.version is not None and view.model_key and view.request_key
        ttl = min(model.revocation_delay_s, wire.MAX_REVOCATION_DELAY_S)
        if view.user_max_delay_s is not None:
            ttl = min(ttl, view.user_max_delay_s)
        version, digest = view.version.version, view.version.digest
        aad = wire.release_aad(token, model_id, user_id, version, digest, ttl)
        body = {
            "v": wire.VERSION,
            "model_key": b64e(hpke.seal(session.public_key, view.model_key, info=wire.INFO_RELEASE_MODEL_KEY, aad=aad)),
            "request_key": b64e(
                hpke.seal(session.public_key, view.request_key, info=wire.INFO_RELEASE_REQUEST_KEY, aad=aad)
            ),
            "model_version": version,
            "model_digest": digest,
            "ttl_s": ttl,
        }
        self.store.audit({**audit, "outcome": "allowed", "version": version})
        return body


def _summarise(text: str, limit: int = 300) -> str:
    """An audit-safe summary of a refusal: printable ASCII only, bounded, so attacker-chosen
    evidence fields cannot bloat the audit log or smuggle control characters into it."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def decode_field(obj: dict, name: str) -> bytes:
    """Base64url field of a request body, with the field named in the error."""
    if name not in obj:
        raise BadRequest(f"{name}: missing", code="malformed")
    return b64d(obj[name], name)
