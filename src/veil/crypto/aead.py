"""AES-256-GCM with a fresh random 96-bit nonce per message, prepended to the ciphertext."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey

NONCE_BYTES = 12
TAG_BYTES = 16


def encrypt(key: SymmetricKey, plaintext: bytes, associated_data: bytes) -> bytes:
    """Return nonce ‖ ciphertext ‖ tag. The nonce is random, so no caller can reuse one."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key.material()).encrypt(nonce, plaintext, associated_data)


def decrypt(key: SymmetricKey, sealed: bytes, associated_data: bytes) -> bytes:
    """Open what `encrypt` produced; any change to key, data or AAD raises IntegrityError."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise MalformedError("ciphertext", "shorter than nonce and tag")
    try:
        return AESGCM(key.material()).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise IntegrityError("authentication failed (wrong key, tampered data or AAD)") from None
