"""HKDF-SHA256 derivations used by the protocols."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.crypto.keys import KEY_BYTES, SymmetricKey


def derive_key(key: SymmetricKey, label: bytes, context: bytes) -> SymmetricKey:
    """Derive a 256-bit key bound to `label` and `context` (HKDF info = label ‖ 0x00 ‖ context)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label + b"\x00" + context)
    return SymmetricKey(hkdf.derive(key.material()))
