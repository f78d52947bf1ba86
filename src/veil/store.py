"""The model store: where sealed (encrypted) model files live, one file per (model, version).

Untrusted: it only ever holds ciphertext, and the runtime checks every file it reads against the
version and digest the KeyService released. A local directory by default; a network store
implements the same methods. A store whose root does not exist is an error, never an empty store
(a runtime on a node without the store must say so, not report every model as unknown).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from veil.crypto.envelope import check_identifier
from veil.errors import NotFound, TooLarge, Unavailable

SUFFIX = ".veilm"
_VERSION_FILE = re.compile(r"^v([0-9]{1,15})\.veilm$")


class ModelStore(Protocol):
    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int: ...

    def open(self, model_id: str, version: int) -> BinaryIO: ...

    def exists(self, model_id: str, version: int) -> bool: ...

    def versions(self, model_id: str) -> list[int]: ...

    def delete(self, model_id: str, version: int) -> None: ...


class PendingUpload:
    """One sealed file on its way into the store; invisible until `commit`."""

    HEAD_BYTES = 8192

    def __init__(self, target: Path, max_bytes: int | None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        self._tmp = Path(tmp)
        self._out = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.head = b""
        self._done = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise TooLarge(f"sealed model exceeds {self.max_bytes} bytes")
        if len(self.head) < self.HEAD_BYTES:
            self.head += chunk[: self.HEAD_BYTES - len(self.head)]
        self._hash.update(chunk)
        self._out.write(chunk)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> int:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        os.replace(self._tmp, self.target)
        self._done = True
        return self.size

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._out.close()
            self._tmp.unlink(missing_ok=True)


def _check_version(version: object) -> int:
    if type(version) is not int or not 1 <= version < 10**15:
        raise ValueError("version must be a positive integer")
    return version


class LocalModelStore:
    """Sealed models as files `<root>/models/<model_id>/v<version>.veilm`, written atomically."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        if create:
            self.models.mkdir(parents=True, exist_ok=True)
        elif not self.models.is_dir():
            raise Unavailable(f"model store {self.root} does not exist (or has no models/ directory)", code="no_store")

    def path(self, model_id: str, version: int) -> Path:
        return self.models / check_identifier(model_id, "model") / f"v{_check_version(version)}{SUFFIX}"

    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int:
        """Stream a sealed model in (temporary file, fsync, rename); over `max_bytes` nothing is kept."""
        upload = self.begin_upload(model_id, version, max_bytes=max_bytes)
        try:
            while chunk := source.read(1 << 20):
                upload.write(chunk)
            return upload.commit()
        finally:
            upload.abort()

    def begin_upload(self, model_id: str, version: int, *, max_bytes: int | None = None) -> PendingUpload:
        """A streamed upload into a temporary file: `write` chunks, check `sha256()` and `head`,
        then `commit` (fsync, rename into place) or `abort` (nothing of it remains)."""
        target = self.path(model_id, version)
        target.parent.mkdir(exist_ok=True)
        return PendingUpload(target, max_bytes)

    def open(self, model_id: str, version: int) -> BinaryIO:
        try:
            return self.path(model_id, version).open("rb")
        except FileNotFoundError:
            raise NotFound(
                f"model {model_id!r} version {version} is not in the model store", code="unknown_model"
            ) from None

    def exists(self, model_id: str, version: int) -> bool:
        return self.path(model_id, version).exists()

    def versions(self, model_id: str) -> list[int]:
        folder = self.models / check_identifier(model_id, "model")
        if not folder.is_dir():
            return []
        found = (_VERSION_FILE.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def delete(self, model_id: str, version: int) -> None:
        self.path(model_id, version).unlink(missing_ok=True)
