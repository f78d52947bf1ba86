"""The model store: where sealed (encrypted) model files live. Untrusted: it only ever holds
ciphertext. A local directory by default; an S3-compatible store can implement the same
three methods."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from veil.crypto.envelope import check_identifier
from veil.errors import NotFound

SUFFIX = ".veilm"


class ModelStore(Protocol):
    def put(self, model_id: str, source: BinaryIO) -> int: ...

    def open(self, model_id: str) -> BinaryIO: ...

    def exists(self, model_id: str) -> bool: ...


class LocalModelStore:
    """Sealed models as files `<root>/models/<model_id>.veilm`, replaced atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.models.mkdir(parents=True, exist_ok=True)

    def path(self, model_id: str) -> Path:
        return self.models / f"{check_identifier(model_id, 'model')}{SUFFIX}"

    def put(self, model_id: str, source: BinaryIO) -> int:
        """Copy a sealed model in (write to a temporary file, fsync, rename)."""
        target = self.path(model_id)
        fd, tmp = tempfile.mkstemp(dir=self.models, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def open(self, model_id: str) -> BinaryIO:
        try:
            return self.path(model_id).open("rb")
        except FileNotFoundError:
            raise NotFound(f"model {model_id!r} is not in the model store", code="unknown_model") from None

    def exists(self, model_id: str) -> bool:
        return self.path(model_id).exists()
