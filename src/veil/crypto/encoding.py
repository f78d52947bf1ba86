"""Strict base64url and canonical JSON, the encodings of every Veil wire format."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from veil.crypto.errors import MalformedError

_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def b64e(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: object, field: str = "value") -> bytes:
    """Decode canonical base64url (unpadded, or correctly padded), naming `field` in any error.

    Strict on purpose: Python's lenient decoder skips foreign characters and accepts non-zero
    trailing bits, which would give one value several encodings (malleable signatures and MACs).
    Fast on large payloads: one C pass (`strict_mode`) plus a canonicity check of the last block.
    """
    if not isinstance(text, str):
        raise MalformedError(field, "expected a base64url string")
    stripped = text.rstrip("=")
    if "+" in stripped or "/" in stripped:
        raise MalformedError(field, "not base64url (only A-Z a-z 0-9 - _ and trailing '=' padding allowed)")
    padding = len(text) - len(stripped)
    if len(stripped) % 4 == 1 or (padding and padding != -len(stripped) % 4):
        raise MalformedError(field, "not valid base64url (impossible length or padding)")
    try:
        standard = (stripped + "=" * (-len(stripped) % 4)).encode("ascii").translate(_TO_STANDARD)
        data = binascii.a2b_base64(standard, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedError(field, "not base64url (only A-Z a-z 0-9 - _ and trailing '=' padding allowed)") from None
    tail = len(stripped) % 4
    if tail and b64e(data[-(tail - 1) :]) != stripped[-tail:]:
        raise MalformedError(field, "not canonical base64url (non-zero trailing bits)")
    return data


def canonical_json(obj: Any) -> bytes:
    """Serialise `obj` deterministically (sorted keys, no spaces, UTF-8) for hashing and AAD."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
