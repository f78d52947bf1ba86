"""Strict base64url and canonical JSON, the encodings of every Veil wire format."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from veil.crypto.errors import MalformedError

_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}\Z")


def b64e(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: object, field: str = "value") -> bytes:
    """Decode canonical base64url (unpadded, or correctly padded), naming `field` in any error.

    Strict on purpose: Python's decoder silently skips foreign characters and accepts non-zero
    trailing bits, which would give one value several encodings (malleable signatures and MACs).
    """
    if not isinstance(text, str):
        raise MalformedError(field, "expected a base64url string")
    if not _B64URL.match(text):
        raise MalformedError(field, "not base64url (only A-Z a-z 0-9 - _ and trailing '=' padding allowed)")
    stripped = text.rstrip("=")
    if len(stripped) % 4 == 1 or (stripped != text and len(text) % 4):
        raise MalformedError(field, "not valid base64url (impossible length or padding)")
    try:
        data = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedError(field, f"not valid base64url ({exc})") from None
    if b64e(data) != stripped:
        raise MalformedError(field, "not canonical base64url (non-zero trailing bits)")
    return data


def canonical_json(obj: Any) -> bytes:
    """Serialise `obj` deterministically (sorted keys, no spaces, UTF-8) for hashing and AAD."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
