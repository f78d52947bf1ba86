"""Chunked sealing of model files (protocol `docs/protocol.md#sealed-model-files`).

Layout: magic ‖ u32 header length ‖ canonical-JSON header ‖ records, each u32 length ‖ nonce ‖
ciphertext ‖ tag. Each chunk's AAD is SHA-256(header) ‖ u64 index ‖ u8 final flag, so chunks
cannot be reordered, dropped, duplicated, moved between files, truncated after, or extended past
the final one. Decryption streams: it never holds more than one chunk of ciphertext at a time
and never writes plaintext anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from veil.crypto import aead
from veil.crypto.encoding import canonical_json
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey

MAGIC = b"VEILMDL1"
VERSION = 1
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 64 << 20
MAX_HEADER = 4096
_OVERHEAD = aead.NONCE_BYTES + aead.TAG_BYTES


def _chunk_aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return header_hash + struct.pack(">QB", index, 1 if final else 0)


def seal_stream(
    key: SymmetricKey, source: BinaryIO, sink: BinaryIO, *, model: str, chunk_size: int = DEFAULT_CHUNK
) -> int:
    """Encrypt `source` into `sink` chunk by chunk; returns the number of bytes written."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise MalformedError("chunk_size", "must be between 1 byte and 64 MiB")
    header = canonical_json({"v": VERSION, "model": model, "file_id": os.urandom(16).hex(), "chunk_size": chunk_size})
    header_hash = hashlib.sha256(header).digest()
    written = sink.write(MAGIC + struct.pack(">I", len(header)) + header)
    index = 0
    current = source.read(chunk_size)
    while True:
        upcoming = source.read(chunk_size)
        final = not upcoming
        record = aead.encrypt(key, current, _chunk_aad(header_hash, index, final))
        written += sink.write(struct.pack(">I", len(record)) + record)
        if final:
            return written
        current, index = upcoming, index + 1


def seal_bytes(key: SymmetricKey, plaintext: bytes, *, model: str, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    """Convenience wrapper of `seal_stream` for in-memory data."""
    out = io.BytesIO()
    seal_stream(key, io.BytesIO(plaintext), out, model=model, chunk_size=chunk_size)
    return out.getvalue()


def _read_exact(source: BinaryIO, n: int, what: str) -> bytes:
    data = source.read(n)
    if len(data) != n:
        raise IntegrityError(f"sealed model truncated while reading {what}")
    return data


def read_header(source: BinaryIO) -> dict:
    """Parse the (authenticated-later) header; raises MalformedError on a foreign file."""
    if source.read(len(MAGIC)) != MAGIC:
        raise MalformedError("sealed_model", "not a Veil sealed model (bad magic)")
    (length,) = struct.unpack(">I", _read_exact(source, 4, "header length"))
    if length > MAX_HEADER:
        raise MalformedError("sealed_model", "header too large")
    raw = _read_exact(source, length, "header")
    try:
        header = json.loads(raw)
    except ValueError:
        raise MalformedError("sealed_model", "header is not JSON") from None
    if not isinstance(header, dict) or type(header.get("v")) is not int or header["v"] != VERSION:
        raise MalformedError("sealed_model", "unsupported header version")
    # The header is authenticated only when the first chunk opens, so bound what it may ask us to read.
    if type(header.get("chunk_size")) is not int or not 1 <= header["chunk_size"] <= MAX_CHUNK:
        raise MalformedError("sealed_model", f"chunk_size must be an integer in 1..{MAX_CHUNK}")
    header["_hash"] = hashlib.sha256(raw).digest()
    return header


def open_stream(key: SymmetricKey, source: BinaryIO, *, model: str) -> Iterator[bytes]:
    """Yield authenticated plaintext chunks of a sealed model, in order.

    Raises IntegrityError if any chunk fails, the final chunk is missing, or data follows it;
    MalformedError if the file is for another model.
    """
    header = read_header(source)
    if header.get("model") != model:
        raise MalformedError("model", f"sealed file is for model {header.get('model')!r}")
    limit = header["chunk_size"] + _OVERHEAD
    index = 0
    while True:
        prefix = source.read(4)
        if len(prefix) != 4:
            raise IntegrityError("sealed model truncated: final chunk missing")
        (length,) = struct.unpack(">I", prefix)
        if not _OVERHEAD <= length <= limit:
            raise IntegrityError(f"chunk {index} has an impossible length {length}")
        record = _read_exact(source, length, f"chunk {index}")
        try:
            plain = aead.decrypt(key, record, _chunk_aad(header["_hash"], index, False))
            final = False
        except IntegrityError:
            plain = aead.decrypt(key, record, _chunk_aad(header["_hash"], index, True))
            final = True
        yield plain
        if final:
            if source.read(1):
                raise IntegrityError("data after the final chunk")
            return
        index += 1


def open_bytes(key: SymmetricKey, sealed: bytes | BinaryIO, *, model: str) -> bytes:
    """Decrypt a whole sealed model into memory (a bytearray joined once)."""
    source = io.BytesIO(sealed) if isinstance(sealed, bytes | bytearray) else sealed
    return b"".join(open_stream(key, source, model=model))
