"""Principal identities: Ed25519 keys; a principal's id is hex SHA-256 of its raw public key.

Every call to the KeyService is signed over method, path, body hash, timestamp, nonce and a
per-principal sequence number that must strictly increase (`docs/protocol.md#signed-requests`),
so a request held back by the network is refused once a later one was accepted. SeSeMI sent a
16-byte shared secret in the clear instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from veil.crypto.encoding import b64d, b64e
from veil.crypto.errors import IntegrityError, MalformedError

SIGNING_CONTEXT = b"veil-request-v2"
HEADER_PRINCIPAL = "x-veil-principal"
HEADER_TIMESTAMP = "x-veil-timestamp"
HEADER_NONCE = "x-veil-nonce"
HEADER_SIGNATURE = "x-veil-signature"
HEADER_SEQ = "x-veil-seq"
_TIMESTAMP = re.compile(r"^[0-9]{1,12}\Z")
_SEQ = re.compile(r"^[1-9][0-9]{0,17}\Z")


def principal_id(public_key: bytes) -> str:
    """The id every party uses for a principal: hex SHA-256 of the raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()


def signing_payload(method: str, path: str, body: bytes, timestamp: int, nonce: str, seq: int) -> bytes:
    """The exact bytes a request signature covers."""
    return b"\n".join(
        [
            SIGNING_CONTEXT,
            method.upper().encode(),
            path.encode(),
            hashlib.sha256(body).hexdigest().encode(),
            str(timestamp).encode(),
            nonce.encode(),
            str(seq).encode(),
        ]
    )


class SequenceCounter:
    """Strictly increasing sequence numbers for one principal: microseconds since the epoch, bumped
    past the last one issued, so separate processes of one principal also move forward."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


@dataclass(frozen=True)
class SignedHeaders:
    principal: str
    timestamp: int
    nonce: str
    seq: int
    signature: bytes

    def as_dict(self) -> dict[str, str]:
        return {
            HEADER_PRINCIPAL: self.principal,
            HEADER_TIMESTAMP: str(self.timestamp),
            HEADER_NONCE: self.nonce,
            HEADER_SEQ: str(self.seq),
            HEADER_SIGNATURE: b64e(self.signature),
        }

    @classmethod
    def from_headers(cls, headers: dict[str, str] | object) -> SignedHeaders:
        get = headers.get  # type: ignore[attr-defined]
        missing = [
            h for h in (HEADER_PRINCIPAL, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SEQ, HEADER_SIGNATURE) if not get(h)
        ]
        if missing:
            raise MalformedError("headers", f"missing {', '.join(missing)}")
        raw_ts = get(HEADER_TIMESTAMP)
        if not _TIMESTAMP.match(raw_ts):
            raise MalformedError(HEADER_TIMESTAMP, "must be a decimal integer (Unix seconds)")
        timestamp = int(raw_ts)
        nonce = get(HEADER_NONCE)
        if not 16 <= len(nonce) <= 64 or not all(c in "0123456789abcdef" for c in nonce):
            raise MalformedError(HEADER_NONCE, "must be 16-64 lowercase hex characters")
        raw_seq = get(HEADER_SEQ)
        if not _SEQ.match(raw_seq):
            raise MalformedError(HEADER_SEQ, "must be a positive decimal integer (at most 18 digits)")
        return cls(get(HEADER_PRINCIPAL), timestamp, nonce, int(raw_seq), b64d(get(HEADER_SIGNATURE), HEADER_SIGNATURE))


class Identity:
    """A principal's private signing key. Never printed; saved only by `to_private_bytes`."""

    __slots__ = ("_key", "_seq", "public_key", "id")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._seq = SequenceCounter()
        self.public_key: bytes = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.id: str = principal_id(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != 32:
            raise MalformedError("identity", "Ed25519 private key must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def to_private_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_request(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        seq: int | None = None,
        timestamp: int | None = None,
        nonce: str | None = None,
    ) -> SignedHeaders:
        """Headers that authenticate one HTTP request; a fresh nonce each time, and the next
        sequence number of this identity unless `seq` is given."""
        ts = int(time.time()) if timestamp is None else timestamp
        nonce = os.urandom(16).hex() if nonce is None else nonce
        seq = self._seq.next() if seq is None else seq
        sig = self.sign(signing_payload(method, path, body, ts, nonce, seq))
        return SignedHeaders(self.id, ts, nonce, seq, sig)

    def __repr__(self) -> str:
        return f"Identity(id={self.id[:16]}…)"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise IntegrityError unless `signature` is a valid Ed25519 signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise IntegrityError("signature does not verify") from None
