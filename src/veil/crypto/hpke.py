"""HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.

Used to send secrets to an attested party: model and request keys to the KeyService, released
keys to a runtime's ephemeral key. Output is enc (32 bytes) ‖ ciphertext.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey
from pyhpke.exceptions import OpenError

from veil.crypto.errors import IntegrityError, MalformedError

SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
ENC_BYTES = 32
PUBLIC_KEY_BYTES = 32


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
        skr = KEMKey.from_pyca_cryptography_key(self._private)
        try:
            ctx = SUITE.create_recipient_context(sealed[:ENC_BYTES], skr, info=info)
            return ctx.open(sealed[ENC_BYTES:], aad=aad)
        except OpenError:
            raise IntegrityError("HPKE open failed (wrong key, info, aad or tampered)") from None
        except ValueError as exc:
            raise IntegrityError(f"HPKE open failed ({exc})") from None

    def __repr__(self) -> str:
        return f"HpkeKeyPair(public={self.public_key.hex()[:16]}…)"


def seal(public_key: bytes, plaintext: bytes, *, info: bytes, aad: bytes = b"") -> bytes:
    """Encrypt to `public_key`; `info` names the purpose so a message cannot be re-purposed."""
    pkr = SUITE.kem.deserialize_public_key(_check_public(public_key))
    enc, ctx = SUITE.create_sender_context(pkr, info=info)
    return enc + ctx.seal(plaintext, aad=aad)
