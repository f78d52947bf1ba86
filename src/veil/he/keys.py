"""The evaluation-key blob a client uploads once: relinearization + the plan's Galois keys.

Layout: b"VEILHEK1" | u32 big-endian header length | JSON header | relin bytes | Galois bytes.
The header names the parameter digest and the Galois elements (3**step mod 2N, one per
rotation the plan performs), so the server can refuse keys made for other parameters before
SEAL parses them. The key id is the hex SHA-256 of the whole blob.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from veil.he.errors import HEError

MAGIC = b"VEILHEK1"
MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class EvalKeyBlob:
    params_digest: str
    galois_elements: list[int]
    relin: bytes | None
    galois: bytes | None

    def pack(self) -> bytes:
        header = json.dumps(
            {
                "v": 1,
                "params_digest": self.params_digest,
                "galois_elements": sorted(self.galois_elements),
                "relin_len": len(self.relin or b""),
                "galois_len": len(self.galois or b""),
            },
            sort_keys=True,
        ).encode()
        return MAGIC + struct.pack(">I", len(header)) + header + (self.relin or b"") + (self.galois or b"")


def key_id(blob: bytes) -> str:
    """The id a client and the server both compute for an evaluation-key blob."""
    return hashlib.sha256(blob).hexdigest()


def unpack_eval_keys(blob: bytes) -> EvalKeyBlob:
    """Parse untrusted bytes into the blob's parts; raises HEError("bad_keys") on any mismatch."""
    if len(blob) < len(MAGIC) + 4 or not blob.startswith(MAGIC):
        raise HEError("bad_keys", "not a Veil evaluation-key blob")
    (hlen,) = struct.unpack_from(">I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > len(blob):
        raise HEError("bad_keys", "evaluation-key header is truncated")
    try:
        header = json.loads(blob[start : start + hlen])
    except ValueError:
        raise HEError("bad_keys", "evaluation-key header is not JSON") from None
    if not isinstance(header, dict) or header.get("v") != 1:
        raise HEError("bad_keys", "unknown evaluation-key header version")
    try:
        digest = str(header["params_digest"])
        elements = [int(e) for e in header["galois_elements"]]
        relin_len, galois_len = int(header["relin_len"]), int(header["galois_len"])
    except (KeyError, TypeError, ValueError):
        raise HEError("bad_keys", "evaluation-key header lacks fields") from None
    body = start + hlen
    if relin_len < 0 or galois_len < 0 or body + relin_len + galois_len != len(blob):
        raise HEError("bad_keys", "evaluation-key blob is truncated or has trailing bytes")
    relin = blob[body : body + relin_len] or None
    galois = blob[body + relin_len :] or None
    return EvalKeyBlob(digest, elements, relin, galois)
