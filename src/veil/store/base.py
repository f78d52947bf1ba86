"""The model store's interface: sealed, versioned blobs, one per (model, version).

The store is untrusted. It only ever holds ciphertext, and the runtime checks every file it reads
against the version and digest the KeyService released, so nothing here has to be trusted for
confidentiality or integrity; what the store must get right is availability and honesty about
absence: a store that does not exist (a missing directory, an unreachable service, a missing
bucket) is an error, never an empty store, so a runtime on a node without the store says so
instead of reporting every model as unknown.

Two roles, because the runtime is measured code and should contain only what it runs:

- `ModelReader` (`open`, `stat`, `exists`, `versions`): what a runtime needs. `open` returns a
  file-like object read chunk by chunk (`veil.crypto.chunked.open_stream`), never the whole file.
- `ModelStore` (a reader that also writes: `put`, `begin_upload`, `delete`): the gateway's and
  the operator's side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from veil.errors import TooLarge

SUFFIX = ".veilm"
MAX_VERSION = 10**15
HEAD_BYTES = 8192  # kept of every upload, so the gateway can parse the sealed header before commit


def check_version(version: object) -> int:
    """A version number as the store accepts it (a positive integer below 10**15)."""
    if type(version) is not int or not 1 <= version < MAX_VERSION:
        raise ValueError("version must be a positive integer")
    return version


@dataclass(frozen=True)
class BlobInfo:
    """What a store knows about one sealed file without reading it.

    `etag` is opaque and changes whenever the file is replaced, so a reader that resumes a broken
    stream with a range request can insist on the same file (`If-Match`)."""

    size: int
    etag: str


class Upload(Protocol):
    """One sealed file on its way into a store, invisible to readers until `commit`.

    `write` chunks in order; `sha256()` and `head` (the first HEAD_BYTES) let the caller check the
    owner's signature and the sealed header before deciding; `commit` makes it visible under its
    (model, version) atomically and returns its size; `abort` leaves nothing of it. `abort` after
    `commit` does nothing, so `try: ... commit() finally: abort()` is the intended use."""

    size: int
    head: bytes

    def write(self, chunk: bytes) -> None: ...

    def sha256(self) -> str: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class ModelReader(Protocol):
    """The runtime's view of a store: read sealed files, list versions."""

    def open(self, model_id: str, version: int, *, offset: int = 0) -> BinaryIO:
        """A file-like object over the sealed file from byte `offset`; NotFound
        (`unknown_model`) when the store has no such file."""
        ...

    def stat(self, model_id: str, version: int) -> BlobInfo: ...

    def exists(self, model_id: str, version: int) -> bool: ...

    def versions(self, model_id: str) -> list[int]: ...


class ModelStore(ModelReader, Protocol):
    """A store that can also be written: the gateway's and the operator's side."""

    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int: ...

    def begin_upload(self, model_id: str, version: int, *, max_bytes: int | None = None) -> Upload: ...

    def delete(self, model_id: str, version: int) -> None: ...


class Tally:
    """Size, SHA-256 and head of an upload as it streams past, with the size limit enforced.

    Every store's upload keeps one, so "over `max_bytes`" and "the first HEAD_BYTES" mean the same
    everywhere."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.head = b""
        self._hash = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        """Count `chunk`; TooLarge (and nothing counted) when it would pass the limit."""
        if self.max_bytes is not None and self.size + len(chunk) > self.max_bytes:
            raise TooLarge(f"sealed model exceeds {self.max_bytes} bytes")
        self.size += len(chunk)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self._hash.update(chunk)

    def sha256(self) -> str:
        return self._hash.hexdigest()


class TalliedUpload:
    """The `Upload` fields every store's upload reads from its `Tally` (`self._tally`)."""

    _tally: Tally

    @property
    def size(self) -> int:
        return self._tally.size

    @property
    def head(self) -> bytes:
        return self._tally.head

    def sha256(self) -> str:
        return self._tally.sha256()


def copy_into(upload: Upload, source: BinaryIO, chunk_size: int = 1 << 20) -> int:
    """Stream `source` into `upload` and commit it; on any failure nothing is kept."""
    try:
        while chunk := source.read(chunk_size):
            upload.write(chunk)
        return upload.commit()
    finally:
        upload.abort()
