"""The evaluation-key blob a client uploads once: relinearization + the plan's Galois keys.

Layout: b"VEILHEK1" | u32 big-endian header length | JSON header | relin bytes | Galois bytes.
The header names the parameter digest and the Galois elements (3**step mod 2N, one per
rotation the plan performs), so the server can refuse keys made for other parameters before
SEAL parses them. The key id is the hex SHA-256 of the whole blob.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from veil.he.errors import HEError
from veil.wire.blobs import HE_KEYS_MAGIC, KEY_PREFIX

MAGIC = b"VEILHEK1"
MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class EvalKeyBlob:
    params_digest: str
    galois_elements: list[int]
    relin: bytes | memoryview | None
    galois: bytes | memoryview | None

    def pack(self) -> bytes:
        return b"".join(eval_key_pieces(self.params_digest, self.galois_elements, self.relin, [self.galois or b""]))


def eval_key_pieces(
    params_digest: str, galois_elements: list[int], relin: bytes | memoryview | None, galois: list[bytes]
) -> list[bytes | memoryview]:
    """The evaluation-key blob as the pieces to write one after another (`EvalKeyBlob.pack`
    joined): the Galois part is tens of MiB, and a client writing its key file need not hold it twice."""
    header = json.dumps(
        {
            "v": 1,
            "params_digest": params_digest,
            "galois_elements": sorted(galois_elements),
            "relin_len": len(relin or b""),
            "galois_len": sum(map(len, galois)),
        },
        sort_keys=True,
    ).encode()
    return [MAGIC + struct.pack(">I", len(header)) + header, relin or b"", *galois]


def key_id(blob: bytes) -> str:
    """The id a client and the server both compute for an evaluation-key blob."""
    return hashlib.sha256(blob).hexdigest()


def _framed(data: bytes | memoryview, magic: bytes, what: str) -> tuple[object, int]:
    """(JSON header, offset of what follows it) of `magic | u32 length | JSON header | ...`."""
    if len(data) < len(magic) + 4 or bytes(data[: len(magic)]) != magic:
        raise HEError("bad_keys", f"not a Veil {what}")
    (hlen,) = struct.unpack_from(">I", data, len(magic))
    start = len(magic) + 4
    if hlen > MAX_HEADER or start + hlen > len(data):
        raise HEError("bad_keys", f"{what} header is truncated")
    try:
        return json.loads(bytes(data[start : start + hlen])), start + hlen
    except (ValueError, RecursionError):
        raise HEError("bad_keys", f"{what} header is not JSON") from None


def _blob_fields(header: object) -> tuple[str, list[int], int, int]:
    """(params digest, Galois elements, relin length, Galois length) of an eval-key blob header."""
    if not isinstance(header, dict) or header.get("v") != 1:
        raise HEError("bad_keys", "unknown evaluation-key header version")
    try:
        digest = str(header["params_digest"])
        elements = [int(e) for e in header["galois_elements"]]
        relin_len, galois_len = int(header["relin_len"]), int(header["galois_len"])
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(1e400)
        raise HEError("bad_keys", "evaluation-key header lacks fields") from None
    if not all(0 < e < 1 << 32 for e in elements) or len(elements) > 1 << 16:
        raise HEError("bad_keys", "evaluation-key header: galois_elements out of range")
    if relin_len < 0 or galois_len < 0:
        raise HEError("bad_keys", "evaluation-key header: negative lengths")
    return digest, elements, relin_len, galois_len


def unpack_eval_keys(blob: bytes | memoryview) -> EvalKeyBlob:
    """Parse untrusted bytes into the blob's parts; raises HEError("bad_keys") on any mismatch."""
    header, body = _framed(blob, MAGIC, "evaluation-key blob")
    digest, elements, relin_len, galois_len = _blob_fields(header)
    if body + relin_len + galois_len != len(blob):
        raise HEError("bad_keys", "evaluation-key blob is truncated or has trailing bytes")
    # views, not copies: the Galois part is most of a blob that can be tens of MiB
    view = memoryview(blob)
    relin = view[body : body + relin_len] if relin_len else None
    galois = view[body + relin_len :] if galois_len else None
    return EvalKeyBlob(digest, elements, relin, galois)


@dataclass(frozen=True)
class EvalKeyHeader:
    """What an eval-key blob says of itself before its keys (read from a stream)."""

    params_digest: str
    galois_elements: list[int]
    relin_len: int
    galois_len: int


def read_eval_key_header(read: Callable[[int], bytes]) -> EvalKeyHeader:
    """The blob header from `read(n)` (exactly n bytes or HEError), leaving the stream at the keys."""
    start = read(len(MAGIC) + 4)
    if start[: len(MAGIC)] != MAGIC:
        raise HEError("bad_keys", "not a Veil evaluation-key blob")
    (hlen,) = struct.unpack_from(">I", start, len(MAGIC))
    if hlen > MAX_HEADER:
        raise HEError("bad_keys", "evaluation-key blob header is truncated")
    try:
        header = json.loads(read(hlen))
    except (ValueError, RecursionError):
        raise HEError("bad_keys", "evaluation-key blob header is not JSON") from None
    return EvalKeyHeader(*_blob_fields(header))


# --- evaluation keys in the model store ----------------------------------------------------------
# A user's uploaded evaluation keys are kept in the (untrusted) model store as one record,
# content-addressed and bound to the principal and model they were uploaded for:
#
#     b"VEILHKR1" | u32 big-endian header length | JSON {"v": 1, "user", "model"} | eval-key blob
#
# stored as model id `hek.<key id>` version 1, where the key id is the SHA-256 of the whole
# record. Any instance that lacks a key fetches the record by id, checks its hash (a store that
# swaps bytes is caught) and that it names the requesting user and the model (another principal's
# request cannot use it), then loads it. Model ids starting with `hek.` are reserved for this.

RECORD_MAGIC = HE_KEYS_MAGIC
STORE_PREFIX = KEY_PREFIX
MAX_KEY_BYTES = 256 * 1024 * 1024  # one documented limit for gateway, store and instances


def record_header(user: str, model: str) -> bytes:
    """The bytes that precede the eval-key blob in its stored record."""
    header = json.dumps({"v": 1, "user": user, "model": model}, sort_keys=True, separators=(",", ":")).encode()
    return RECORD_MAGIC + struct.pack(">I", len(header)) + header


def record_key_id(user: str, model: str, blob: bytes) -> str:
    """The key id of `blob` uploaded by `user` for `model` (what client, gateway and instance compute)."""
    digest = hashlib.sha256(record_header(user, model))
    digest.update(blob)
    return digest.hexdigest()


def store_id(kid: str) -> str:
    """The store's model id under which the record of key id `kid` is kept (as version 1)."""
    return STORE_PREFIX + kid


def open_record(data: bytes, kid: str, user: str, model: str) -> bytes:
    """The eval-key blob inside a whole stored record (`RecordStream`'s checks, for a record
    already in memory); HEError otherwise (never the blob)."""
    source = io.BytesIO(data)
    record = RecordStream(source, kid, user, model)
    blob = record.read(len(data) - source.tell())
    record.finish()
    return blob


class RecordStream:
    """A stored eval-key record read piece by piece: the header is checked first (this
    principal's, this model's), every byte is hashed as it is read, and `finish` checks the
    whole record was the one `kid` names. An instance loads the keys as they arrive and so never
    holds the record (tens of MiB) as well as the keys; whatever it built from a record that
    then fails `finish` must be thrown away."""

    def __init__(self, source: BinaryIO, kid: str, user: str, model: str) -> None:
        self._source, self._kid = source, kid
        self._hash = hashlib.sha256()
        start = self.read(len(RECORD_MAGIC) + 4)
        if start[: len(RECORD_MAGIC)] != RECORD_MAGIC:
            raise HEError("key_integrity", "the store's evaluation-key record is not one (tampered)", 403)
        (hlen,) = struct.unpack_from(">I", start, len(RECORD_MAGIC))
        if hlen > MAX_HEADER:
            raise HEError("key_integrity", "the store's evaluation-key record header is too large (tampered)", 403)
        try:
            header = json.loads(self.read(hlen))
        except (ValueError, RecursionError):
            raise HEError("key_integrity", "the store's evaluation-key record header is not JSON", 403) from None
        if not isinstance(header, dict) or header.get("user") != user or header.get("model") != model:
            raise HEError(
                "key_not_yours",
                f"evaluation keys {kid[:12]}... were not uploaded by this principal for this model",
                403,
            )

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes of the record (HEError when it ends first)."""
        data = self._source.read(n)
        if len(data) != n:
            raise HEError("key_integrity", "the store's evaluation-key record is truncated", 403)
        self._hash.update(data)
        return data

    def finish(self) -> None:
        """Check nothing follows and the record hashes to its id; HEError otherwise."""
        if self._source.read(1):
            raise HEError("key_integrity", "the store's evaluation-key record has trailing bytes", 403)
        if not hmac.compare_digest(self._hash.hexdigest(), self._kid):
            raise HEError("key_integrity", "the store's evaluation-key record does not match its id (tampered)", 403)
