"""The local-directory store: the embedded default, and what `veil store serve` keeps on disk.

Layout `<root>/models/<model_id>/v<version>.veilm`. Writes go to a temporary file in the same
directory, are fsynced and renamed into place, so a reader sees the old file or the new one,
never half of either.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from veil.crypto.fields import check_identifier
from veil.errors import NotFound, Unavailable
from veil.store.base import SUFFIX, BlobInfo, TalliedUpload, Tally, check_version, copy_into

_VERSION_FILE = re.compile(r"^v([0-9]{1,15})\.veilm$")
UPLOAD_PREFIX = ".upload-"


class PendingUpload(TalliedUpload):
    """One sealed file on its way into a local store; invisible until `commit`."""

    def __init__(self, target: Path, max_bytes: int | None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=UPLOAD_PREFIX)
        self._tmp = Path(tmp)
        self._out = os.fdopen(fd, "wb")
        self._tally = Tally(max_bytes)
        self._done = False

    def write(self, chunk: bytes) -> None:
        try:
            self._tally.add(chunk)
        except Exception:
            self.abort()
            raise
        self._out.write(chunk)

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


class LocalModelStore:
    """Sealed models as files under `root`; `create=True` makes the directory (the deployment
    that owns the store does), otherwise a missing root is `Unavailable(code="no_store")`."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        if create:
            self.models.mkdir(parents=True, exist_ok=True)
        elif not self.models.is_dir():
            raise Unavailable(f"model store {self.root} does not exist (or has no models/ directory)", code="no_store")

    def __repr__(self) -> str:
        return f"LocalModelStore({str(self.root)!r})"

    def path(self, model_id: str, version: int) -> Path:
        return self.models / check_identifier(model_id, "model") / f"v{check_version(version)}{SUFFIX}"

    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int:
        """Stream a sealed model in (temporary file, fsync, rename); over `max_bytes` nothing is kept."""
        return copy_into(self.begin_upload(model_id, version, max_bytes=max_bytes), source)

    def begin_upload(self, model_id: str, version: int, *, max_bytes: int | None = None) -> PendingUpload:
        """A streamed upload into a temporary file: `write` chunks, check `sha256()` and `head`,
        then `commit` (fsync, rename into place) or `abort` (nothing of it remains)."""
        target = self.path(model_id, version)
        target.parent.mkdir(exist_ok=True)
        return PendingUpload(target, max_bytes)

    def _missing(self, model_id: str, version: int) -> NotFound:
        return NotFound(f"model {model_id!r} version {version} is not in the model store", code="unknown_model")

    def open(self, model_id: str, version: int, *, offset: int = 0) -> BinaryIO:
        try:
            f = self.path(model_id, version).open("rb")
        except FileNotFoundError:
            raise self._missing(model_id, version) from None
        if offset:
            f.seek(offset)
        return f

    def stat(self, model_id: str, version: int) -> BlobInfo:
        try:
            st = self.path(model_id, version).stat()
        except FileNotFoundError:
            raise self._missing(model_id, version) from None
        # a replaced file is a new inode with a new mtime: the tag changes with the content
        return BlobInfo(size=st.st_size, etag=f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"')

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

    def sweep_uploads(self, older_than_s: float) -> int:
        """Remove temporary upload files older than `older_than_s` (left by a crashed writer);
        returns how many went."""
        cutoff = time.time() - older_than_s
        removed = 0
        for folder in self.models.iterdir():
            if not folder.is_dir():
                continue
            for p in folder.glob(UPLOAD_PREFIX + "*"):
                try:
                    if p.stat().st_mtime < cutoff:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed
