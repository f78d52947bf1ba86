"""Strict base64url and canonical JSON, the encodings of every Veil wire format."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from veil.crypto.errors import MalformedError


def b64e(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: object, field: str = "value") -> bytes:
    """Decode unpadded (or padded) base64url, naming `field` in the error when it is not."""
    if not isinstance(text, str):
        raise MalformedError(field, "expected a base64url string")
    if any(c in text for c in "+/ \n\r\t"):
        raise MalformedError(field, "not base64url (found characters outside the alphabet)")
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise MalformedError(field, f"not valid base64url ({exc})") from None


def canonical_json(obj: Any) -> bytes:
    """Serialise `obj` deterministically (sorted keys, no spaces, UTF-8) for hashing and AAD."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
