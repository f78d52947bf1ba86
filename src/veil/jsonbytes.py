"""JSON objects whose bulk is base64url text, encoded without the standard encoder's per-character
escaping, and objects that carry their exact encoding along.

Every HE request and answer is a small JSON object holding a few large base64url strings (the
ciphertexts: 21 KB up, 41 KB back for the LR). `json.dumps` escapes such a string character by
character: measured 72 us for the LR request and 136 us for its answer, paid at each hop that
encodes one (the platform's /run body, the runtime's answer, the gateway's answer). A string
that holds only base64url characters needs no escaping, so it is written as it is;
anything else (any other character, any other type) goes through `json.dumps`. The object is
the same; the bulk fields come last in the text.

`Encoded` is a dict that also holds its own JSON bytes: the runtime's answer (`to_json_bytes`)
and a /run answer as the platform parsed it, so the gateway relays the runtime's bytes instead
of encoding the same object again.
"""

from __future__ import annotations

import json
from typing import Any

_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="
#: strings shorter than this go through json.dumps (checking them would cost more than it saves)
_LONG = 512


class Encoded(dict):
    """A JSON object and its exact encoding (`encoded`), kept together so that a hop that only
    passes the object on can send the bytes it came as."""

    __slots__ = ("encoded",)

    def __init__(self, obj: dict[str, Any], encoded: bytes) -> None:
        super().__init__(obj)
        self.encoded = encoded


def is_plain(text: str) -> bool:
    """Whether `text` holds only base64url characters (and so needs no JSON escaping)."""
    return text.isascii() and not text.encode("ascii").translate(None, _B64URL)


def _plain_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(s, str) and len(s) >= _LONG and is_plain(s) for s in value)
    )


def dumps_object(obj: dict[str, Any], *, trusted: bool = False) -> bytes:
    """`obj` as compact JSON bytes: the same object `json.dumps(obj, separators=(",", ":"))`
    encodes, with the values that are lists of long base64url strings written as they are, after
    the other fields (one `json.dumps` for those). `trusted`: the caller made those strings itself
    (`b64e`), so they are not checked. Raises TypeError/ValueError as `json.dumps` does (NaN
    refused)."""
    bulk = [
        k
        for k, v in obj.items()
        if isinstance(k, str)
        and isinstance(v, list)
        and v
        and (all(isinstance(s, str) for s in v) if trusted else _plain_list(v))
    ]
    if not bulk:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    named = set(bulk)
    rest = {k: v for k, v in obj.items() if k not in named}
    head = json.dumps(rest, separators=(",", ":"), allow_nan=False).encode()
    tail = b",".join(json.dumps(k).encode() + b':["' + '","'.join(obj[k]).encode("ascii") + b'"]' for k in bulk)
    return (head[:-1] + b"," if rest else b"{") + tail + b"}"
