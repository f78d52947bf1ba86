"""HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.

Used to send secrets to an attested party: model and request keys to the KeyService, released
keys to a runtime's ephemeral key. Output is enc (32 bytes) ‖ ciphertext.

Single-shot seal/open are implemented here directly on `cryptography`'s X25519 and AES-GCM and
the C HMAC (RFC 9180 §4.1, §5.1): the key-release hot path seals twice per release, and pyhpke's
pure-Python key schedule tripled its cost. `SUITE` (pyhpke) stays as the independent reference
the tests check these bytes against.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

from veil.crypto.errors import IntegrityError, MalformedError

SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
ENC_BYTES = 32
PUBLIC_KEY_BYTES = 32
_KEM_SUITE_ID = b"KEM" + struct.pack(">H", 0x0020)
_HPKE_SUITE_ID = b"HPKE" + struct.pack(">HHH", 0x0020, 0x0001, 0x0002)
_MODE_BASE = b"\x00"


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(32), ikm, hashlib.sha256)


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    # Every output here is at most 32 bytes: one HKDF-Expand block.
    return hmac.digest(prk, info + b"\x01", hashlib.sha256)[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info, length)


def _shared_secret(dh: bytes, enc: bytes, recipient_public: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", enc + recipient_public, 32)


@functools.lru_cache(maxsize=64)
def _context(info: bytes) -> bytes:
    """key_schedule_context for base mode; `info` is one of a few fixed labels, so cache it."""
    psk_id_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE_ID, b"", b"info_hash", info)
    return _MODE_BASE + psk_id_hash + info_hash


def _key_schedule(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    context = _context(bytes(info))
    secret = _labeled_extract(_HPKE_SUITE_ID, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE_ID, secret, b"key", context, 32)
    base_nonce = _labeled_expand(_HPKE_SUITE_ID, secret, b"base_nonce", context, 12)
    return key, base_nonce


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_public(public_key: bytes) -> bytes:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise MalformedError("public_key", f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return public_key


class HpkeKeyPair:
    """A recipient key pair. The private half stays inside this object; repr hides it."""

    __slots__ = ("_private", "public_key")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> HpkeKeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> HpkeKeyPair:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Raw private key, only for sealing it at rest."""
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def open(self, sealed: bytes, *, info: bytes, aad: bytes = b"") -> bytes:
        """Decrypt what `seal` sent to this key pair with the same info and aad."""
        if len(sealed) < ENC_BYTES + 16:
            raise MalformedError("sealed", "too short for an HPKE message")
        enc = sealed[:ENC_BYTES]
        try:
            dh = self._private.exchange(X25519PublicKey.from_public_bytes(enc))
        except ValueError as exc:  # an all-zero shared secret (small-order point) is refused
            raise IntegrityError(f"HPKE open failed ({exc})") from None
        key, nonce = _key_schedule(_shared_secret(dh, enc, self.public_key), info)
        try:
            return AESGCM(key).decrypt(nonce, sealed[ENC_BYTES:], aad)
        except InvalidTag:
            raise IntegrityError("HPKE open failed (wrong key, info, aad or tampered)") from None

    def __repr__(self) -> str:
        return f"HpkeKeyPair(public={self.public_key.hex()[:16]}…)"


def seal(public_key: bytes, plaintext: bytes, *, info: bytes, aad: bytes = b"") -> bytes:
    """Encrypt to `public_key`; `info` names the purpose so a message cannot be re-purposed."""
    return _seal_with(X25519PrivateKey.generate(), public_key, plaintext, info=info, aad=aad)


def _seal_with(ephemeral: X25519PrivateKey, public_key: bytes, plaintext: bytes, *, info: bytes, aad: bytes) -> bytes:
    """`seal` with a given ephemeral key: deterministic, for test vectors only."""
    recipient = X25519PublicKey.from_public_bytes(_check_public(public_key))
    try:
        dh = ephemeral.exchange(recipient)
    except ValueError:
        raise MalformedError("public_key", "not a usable X25519 public key (small-order point)") from None
    enc = _raw_public(ephemeral)
    key, nonce = _key_schedule(_shared_secret(dh, enc, public_key), info)
    return enc + AESGCM(key).encrypt(nonce, plaintext, aad)
