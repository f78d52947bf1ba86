"""Chunked sealing of model files (protocol `docs/protocol.md#sealed-model-files`).

Layout: magic ‖ u32 header length ‖ canonical-JSON header ‖ records, each u32 length ‖ nonce ‖
ciphertext ‖ tag. The header binds model id, version and content digest (HMAC-SHA256 of the
plaintext model under a key derived from the model key), so a runtime told "version 7, digest d"
by the KeyService refuses an older sealed file (rollback) or another one (substitution), even
under the same key.

Each chunk's AAD is SHA-256(header) ‖ u64 index ‖ u8 final flag, so chunks
cannot be reordered, dropped, duplicated, moved between files, truncated after, or extended past
the final one. Decryption streams: it never holds more than one chunk of ciphertext at a time
and never writes plaintext anywhere. `open_into` decrypts straight into one preallocated buffer
(sized from the sealed file's length, which bounds the plaintext's), so a large model exists in
memory once, in the buffer a runtime then hands to ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.crypto import aead
from veil.crypto.encoding import canonical_json
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey

MAGIC = b"VEILMDL1"
VERSION = 2
DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 64 << 20
MAX_HEADER = 4096
_OVERHEAD = aead.NONCE_BYTES + aead.TAG_BYTES


def _chunk_aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return header_hash + struct.pack(">QB", index, 1 if final else 0)


DIGEST_LABEL = b"veil model digest"


def content_digest(key: SymmetricKey, plaintext: bytes) -> str:
    """The content digest a sealed header and the KeyService record: HMAC-SHA256 of the model
    under a key derived from the model key. Keyed, so the value the store and the network see
    cannot confirm a guess of the model (a plain hash of a public base model would)."""
    mac_key = derive_key(key, DIGEST_LABEL, b"")
    return hmac.new(mac_key.material(), plaintext, hashlib.sha256).hexdigest()


def _check_version(version: object) -> int:
    if type(version) is not int or not 1 <= version < 1 << 53:
        raise MalformedError("version", "must be an integer ≥ 1")
    return version


def _check_digest(digest: object) -> str:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise MalformedError("digest", "must be 64 lowercase hex characters (an HMAC-SHA256 content digest)")
    return digest


def seal_stream(
    key: SymmetricKey,
    source: BinaryIO,
    sink: BinaryIO,
    *,
    model: str,
    version: int,
    digest: str,
    chunk_size: int = DEFAULT_CHUNK,
) -> int:
    """Encrypt `source` into `sink` chunk by chunk; returns the number of bytes written.

    `digest` is `content_digest(key, ...)` of what `source` yields (known before sealing)."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise MalformedError("chunk_size", "must be between 1 byte and 64 MiB")
    header = canonical_json(
        {
            "v": VERSION,
            "model": model,
            "version": _check_version(version),
            "digest": _check_digest(digest),
            "file_id": os.urandom(16).hex(),
            "chunk_size": chunk_size,
        }
    )
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


def seal_bytes(
    key: SymmetricKey, plaintext: bytes, *, model: str, version: int = 1, chunk_size: int = DEFAULT_CHUNK
) -> bytes:
    """Convenience wrapper of `seal_stream` for in-memory data (computes the digest)."""
    out = io.BytesIO()
    seal_stream(
        key,
        io.BytesIO(plaintext),
        out,
        model=model,
        version=version,
        digest=content_digest(key, plaintext),
        chunk_size=chunk_size,
    )
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
    except (ValueError, RecursionError):
        raise MalformedError("sealed_model", "header is not JSON") from None
    if not isinstance(header, dict) or type(header.get("v")) is not int or header["v"] != VERSION:
        raise MalformedError("sealed_model", "unsupported header version")
    # The header is authenticated only when the first chunk opens, so bound what it may ask us to read.
    if type(header.get("chunk_size")) is not int or not 1 <= header["chunk_size"] <= MAX_CHUNK:
        raise MalformedError("sealed_model", f"chunk_size must be an integer in 1..{MAX_CHUNK}")
    try:
        _check_version(header.get("version"))
        _check_digest(header.get("digest"))
    except MalformedError as exc:
        raise MalformedError("sealed_model", f"header {exc}") from None
    header["_hash"] = hashlib.sha256(raw).digest()
    return header


def open_stream(
    key: SymmetricKey, source: BinaryIO, *, model: str, version: int | None = None, digest: str | None = None
) -> Iterator[bytes]:
    """Yield authenticated plaintext chunks of a sealed model, in order.

    Raises IntegrityError if any chunk fails, the final chunk is missing, or data follows it;
    MalformedError if the file is for another model, or (when given) another version or digest
    than the KeyService released: the header is authenticated by the first chunk's AAD.
    """
    header = _released_header(source, model, version, digest)
    limit = header["chunk_size"] + _OVERHEAD
    index = 0
    while True:
        record = _next_record(source, index, limit)
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


def _released_header(source: BinaryIO, model: str, version: int | None, digest: str | None) -> dict:
    """The sealed header, checked against what the KeyService released (model, version, digest)."""
    header = read_header(source)
    if header.get("model") != model:
        raise MalformedError("model", f"sealed file is for model {header.get('model')!r}")
    if version is not None and header["version"] != version:
        raise MalformedError("version", f"sealed file is version {header['version']}, the released one is {version}")
    if digest is not None and not hmac.compare_digest(header["digest"], digest):
        raise MalformedError("digest", "sealed file's content digest is not the released one")
    return header


def _next_record(source: BinaryIO, index: int, limit: int) -> bytes:
    """The next record (nonce ‖ ciphertext ‖ tag) of a sealed file, its length bounded first."""
    prefix = source.read(4)
    if len(prefix) != 4:
        raise IntegrityError("sealed model truncated: final chunk missing")
    (length,) = struct.unpack(">I", prefix)
    if not _OVERHEAD <= length <= limit:
        raise IntegrityError(f"chunk {index} has an impossible length {length}")
    return _read_exact(source, length, f"chunk {index}")


def plaintext_bound(sealed_size: int) -> int:
    """The most plaintext a sealed file of `sealed_size` bytes can hold: its size less the magic,
    the header length and one record's framing (any header and further records only take more)."""
    return max(0, sealed_size - len(MAGIC) - 4 - 4 - _OVERHEAD)


def open_into(
    key: SymmetricKey,
    source: BinaryIO,
    *,
    model: str,
    version: int | None = None,
    digest: str | None = None,
    sealed_size: int | None = None,
) -> bytearray:
    """Decrypt a sealed model into one buffer: the whole plaintext, exactly as `open_bytes`
    returns it and refused exactly when `open_bytes` refuses (same header checks, same chunk
    AADs, same truncation and trailing-data rules), but with each chunk decrypted in place
    (AES-GCM `decrypt_into`) into a bytearray allocated once, so no chunk list, join or second
    copy of the plaintext ever exists.

    `sealed_size` (the sealed file's length, as the store reports it) sizes the buffer
    (`plaintext_bound`); the buffer is then trimmed in place to the plaintext's length (a small
    shrink: CPython keeps the allocation, nothing is copied). A file whose plaintext does not fit
    that bound is refused (IntegrityError): the store misreported its size. Without
    `sealed_size` the buffer grows as chunks arrive.

    On any failure nothing is returned: the partly filled buffer (which may hold unauthenticated
    bytes of the failing chunk) is dropped with the exception.
    """
    header = _released_header(source, model, version, digest)
    limit = header["chunk_size"] + _OVERHEAD
    fixed = sealed_size is not None
    buf = bytearray(plaintext_bound(sealed_size) if sealed_size is not None else 0)
    cipher = AESGCM(key.material())
    filled = 0
    index = 0
    while True:
        record = _next_record(source, index, limit)
        n = len(record) - _OVERHEAD
        if filled + n > len(buf):
            if fixed:
                raise IntegrityError("sealed model is longer than the store reported")
            buf.extend(bytes(filled + n - len(buf)))
        nonce, body = record[: aead.NONCE_BYTES], memoryview(record)[aead.NONCE_BYTES :]  # no copy
        final = False
        with memoryview(buf) as view:
            out = view[filled : filled + n]
            try:
                cipher.decrypt_into(nonce, body, _chunk_aad(header["_hash"], index, False), out)
            except InvalidTag:
                try:
                    cipher.decrypt_into(nonce, body, _chunk_aad(header["_hash"], index, True), out)
                except InvalidTag:
                    raise IntegrityError("authentication failed (wrong key, tampered data or AAD)") from None
                final = True
            finally:
                out.release()
                body.release()
        filled += n
        if final:
            if source.read(1):
                raise IntegrityError("data after the final chunk")
            del buf[filled:]
            return buf
        index += 1


def open_bytes(
    key: SymmetricKey,
    sealed: bytes | BinaryIO,
    *,
    model: str,
    version: int | None = None,
    digest: str | None = None,
) -> bytes:
    """Decrypt a whole sealed model into memory (a bytearray joined once)."""
    source = io.BytesIO(sealed) if isinstance(sealed, bytes | bytearray) else sealed
    return b"".join(open_stream(key, source, model=model, version=version, digest=digest))
