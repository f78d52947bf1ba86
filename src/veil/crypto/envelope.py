"""Request and response envelopes (protocol `docs/protocol.md#envelopes`).

Wire form (version 2):

    {"v": 2, "model": id, "user": id, "request_id": 32 hex, "direction": "request"|"response",
     "expires": int Unix seconds, "ct": b64url(nonce ‖ AES-256-GCM ciphertext ‖ tag)}

The AAD is the canonical JSON of every field but `ct`, so it binds version, model id, user id,
request id, direction and the validity window: a ciphertext cannot be moved to another model,
user or request, a response cannot be replayed as a request, and nobody can stretch `expires`.
Responses use a key derived from the request key and the request id, so the two directions never
share a key; a response carries the `expires` of the request it answers.

The receiver of a request (the runtime) accepts it only inside its window: refused once
`now > expires + CLOCK_SKEW_S` (expired), or when `expires > now + MAX_LIFETIME_S + CLOCK_SKEW_S`
(a window longer than any receiver keeps a replay record for); and it refuses a request id it
has already accepted within that window. Version 1 (no window) is refused.

Binary form (content type `application/vnd.veil.envelope`, the same envelope without base64 or
JSON around the ciphertext, so relays forward it untouched and receivers read it in place):

    "VEN2" ‖ u16be header_len ‖ u32be ct_len ‖ header ‖ ct

`header` is the AAD itself: the canonical JSON of the six header fields (1..1024 bytes); `ct` is
nonce ‖ ciphertext ‖ tag (≥ 28 bytes); nothing may follow `ct`. The header is checked exactly as
the JSON form's (same fields, same rules) and must be canonical, so one envelope has one binary
encoding and the AAD a receiver computes is the header it read.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

from veil.crypto import aead
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.errors import MalformedError
from veil.crypto.fields import check_identifier as check_identifier  # re-exported: envelope fields
from veil.crypto.fields import new_request_id as new_request_id  # re-exported: envelope fields
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey

VERSION = 2
RESPONSE_LABEL = b"veil response"
DEFAULT_LIFETIME_S = 120  # `seal` makes envelopes valid this long unless told otherwise
MAX_LIFETIME_S = 600  # a receiver refuses a window reaching further into the future than this
CLOCK_SKEW_S = 60  # tolerated difference between sender's and receiver's clocks, both ways
MAX_EXPIRES = 1 << 53  # exactly representable in every JSON implementation
Direction = Literal["request", "response"]
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = {"v", "model", "user", "request_id", "direction", "expires", "ct"}
_HEADER_FIELDS = _FIELDS - {"ct"}
BINARY_CONTENT_TYPE = "application/vnd.veil.envelope"
BINARY_MAGIC = b"VEN2"
_PREFIX = struct.Struct(">4sHI")  # magic, header length, ct length
BINARY_PREFIX_BYTES = _PREFIX.size  # 10
MAX_BINARY_HEADER = 1024
MIN_CT = 12 + 16  # nonce and tag


def default_expires(now: float | None = None) -> int:
    """The `expires` of a new envelope: now + DEFAULT_LIFETIME_S, in integer Unix seconds."""
    return int(time.time() if now is None else now) + DEFAULT_LIFETIME_S


def check_expires(value: object) -> int:
    """`expires`: an integer number of Unix seconds in 1..2^53-1 (not a bool, not a float)."""
    if type(value) is not int or not 1 <= value < MAX_EXPIRES:
        raise MalformedError("expires", "must be an integer number of Unix seconds")
    return value


@dataclass(frozen=True)
class Envelope:
    """One encrypted message. `ct` is nonce ‖ AES-GCM ciphertext ‖ tag (bytes, or a view into
    the binary form it was read from); `expires` (keyword only) is the end of its validity
    window in Unix seconds."""

    model: str
    user: str
    request_id: str
    direction: Direction
    ct: bytes | memoryview
    _: KW_ONLY
    expires: int

    def header(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "model": self.model,
            "user": self.user,
            "request_id": self.request_id,
            "direction": self.direction,
            "expires": self.expires,
        }

    def aad(self) -> bytes:
        return canonical_json(self.header())

    def to_json(self) -> dict[str, Any]:
        return {**self.header(), "ct": b64e(self.ct)}

    def to_binary(self) -> bytes:
        """The binary form (module docstring): prefix, canonical header, raw `ct`."""
        header = self.aad()
        return b"".join((_PREFIX.pack(BINARY_MAGIC, len(header), len(self.ct)), header, self.ct))

    @classmethod
    def from_json(cls, obj: object, *, decode_ct: bool = True) -> Envelope:
        """Parse and validate the wire form; every error names its field.

        `decode_ct=False` validates the header only (and that `ct` is a string), leaving `ct`
        empty: for relays such as the gateway, which forward the envelope and cannot open it
        anyway. The runtime parses it fully and authenticates it.
        """
        if not isinstance(obj, dict):
            raise MalformedError("envelope", "must be a JSON object")
        return cls._checked(obj, _FIELDS, lambda: b64d(obj["ct"], "ct") if decode_ct else _check_ct_text(obj["ct"]))

    @classmethod
    def from_binary(cls, data: bytes | bytearray | memoryview) -> Envelope:
        """Parse and validate the binary form without copying the ciphertext: `ct` is a view
        into `data`. Every error names its field (`envelope`, `magic`, `header_length`,
        `ct_length`, `header`, `ct` or a header field)."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        size = len(view)
        if size < BINARY_PREFIX_BYTES:
            raise MalformedError(
                "envelope", f"truncated: {size} bytes, shorter than the {BINARY_PREFIX_BYTES}-byte prefix"
            )
        magic, header_len, ct_len = _PREFIX.unpack_from(view)
        if magic != BINARY_MAGIC:
            if magic[:3] == BINARY_MAGIC[:3]:
                raise MalformedError(
                    "v", f"unsupported binary envelope version {magic[3:]!r}, expected {BINARY_MAGIC!r}"
                )
            raise MalformedError("magic", f"not a binary envelope (expected {BINARY_MAGIC!r})")
        if not 1 <= header_len <= MAX_BINARY_HEADER:
            raise MalformedError("header_length", f"{header_len}: must be 1..{MAX_BINARY_HEADER}")
        if ct_len < MIN_CT:
            raise MalformedError("ct_length", f"{ct_len}: shorter than nonce and tag ({MIN_CT} bytes)")
        ct_at = BINARY_PREFIX_BYTES + header_len
        if size < ct_at:
            raise MalformedError("header", f"truncated: {size - BINARY_PREFIX_BYTES} of {header_len} bytes present")
        end = ct_at + ct_len
        if size < end:
            raise MalformedError("ct", f"truncated: {size - ct_at} of the {ct_len} bytes ct_length declares")
        if size > end:
            raise MalformedError("envelope", f"{size - end} trailing bytes after ct")
        header = bytes(view[BINARY_PREFIX_BYTES:ct_at])
        try:
            obj = json.loads(header)
        except (ValueError, RecursionError):
            raise MalformedError("header", "not UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise MalformedError("header", "must be a JSON object")
        envelope = cls._checked(obj, _HEADER_FIELDS, lambda: view[ct_at:end])
        if envelope.aad() != header:
            raise MalformedError("header", "not canonical JSON (sorted keys, no spaces): one envelope, one encoding")
        return envelope

    @classmethod
    def _checked(cls, obj: dict, fields: set[str], ct: Callable[[], bytes | memoryview]) -> Envelope:
        """Validate the header fields of `obj` (exactly `fields`), then take `ct()`."""
        if "v" in obj and (type(obj["v"]) is not int or obj["v"] != VERSION):  # first: v1 lacks `expires`
            if type(obj["v"]) is int and obj["v"] == 1:
                raise MalformedError("v", f"version 1 is not accepted (it has no validity window); use {VERSION}")
            raise MalformedError("v", f"unsupported version {obj['v']!r}, expected {VERSION}")
        missing = fields - obj.keys()
        if missing:
            raise MalformedError("envelope", f"missing fields {sorted(missing)}")
        extra = obj.keys() - fields
        if extra:
            raise MalformedError("envelope", f"unknown fields {sorted(extra)}")
        if obj["direction"] not in ("request", "response"):
            raise MalformedError("direction", "must be 'request' or 'response'")
        request_id = obj["request_id"]
        if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
            raise MalformedError("request_id", "must be 32 lowercase hex characters")
        model = check_identifier(obj["model"], "model")
        user = check_identifier(obj["user"], "user")
        expires = check_expires(obj["expires"])
        return cls(model=model, user=user, request_id=request_id, direction=obj["direction"], ct=ct(), expires=expires)


def is_binary(content_type: str | None) -> bool:
    """Whether a Content-Type names the binary envelope form (parameters ignored)."""
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == BINARY_CONTENT_TYPE


def _check_ct_text(value: object) -> bytes:
    if not isinstance(value, str) or not value:
        raise MalformedError("ct", "expected a non-empty base64url string")
    return b""


def response_key(request_key: SymmetricKey, request_id: str) -> SymmetricKey:
    """HKDF(request key, "veil response", request id): a per-request key for the answer."""
    return derive_key(request_key, RESPONSE_LABEL, request_id.encode())


def _key_for(request_key: SymmetricKey, direction: Direction, request_id: str) -> SymmetricKey:
    return request_key if direction == "request" else response_key(request_key, request_id)


def seal(
    request_key: SymmetricKey,
    plaintext: bytes,
    *,
    model: str,
    user: str,
    request_id: str,
    direction: Direction,
    expires: int | None = None,
) -> Envelope:
    """Encrypt `plaintext` into an envelope for `direction` of request `request_id`, valid until
    `expires` (Unix seconds; default now + DEFAULT_LIFETIME_S). A response takes the request's."""
    expires = default_expires() if expires is None else expires
    header = Envelope(model, user, request_id, direction, b"", expires=expires)
    Envelope.from_json({**header.header(), "ct": "AA"}, decode_ct=False)  # validate the header first
    key = _key_for(request_key, direction, request_id)
    return Envelope(model, user, request_id, direction, aead.encrypt(key, plaintext, header.aad()), expires=expires)


def open_envelope(
    request_key: SymmetricKey,
    envelope: Envelope,
    *,
    model: str,
    user: str,
    direction: Direction,
    request_id: str | None = None,
    expires: int | None = None,
) -> bytes:
    """Decrypt an envelope after checking it is for the expected model, user and direction (and,
    when given, request id and `expires`: an answer carries its request's).

    The header is also authenticated as AAD, so a forged header fails even if these checks pass.
    Validity windows are the receiver's policy (the runtime's), not checked here.
    """
    for field, want in (("model", model), ("user", user), ("direction", direction)):
        if getattr(envelope, field) != want:
            raise MalformedError(field, f"envelope is for {getattr(envelope, field)!r}, expected {want!r}")
    if request_id is not None and envelope.request_id != request_id:
        raise MalformedError("request_id", "envelope answers a different request")
    if expires is not None and envelope.expires != expires:
        raise MalformedError("expires", "envelope does not carry its request's validity window")
    key = _key_for(request_key, direction, envelope.request_id)
    return aead.decrypt(key, envelope.ct, envelope.aad())
