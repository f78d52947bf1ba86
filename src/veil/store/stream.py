"""A sealed file read as a stream that resumes where a broken transfer stopped.

The HTTP store (the runtime's reader) and the S3 adapter differ only in how they (re)open the
stream at a byte offset; the reading, the resume budget and the "read(n) returns n bytes unless
the file ends" contract are the same, so they live here once. Standard library only: the runtime
imports this through `veil.store.remote`, and it is part of the measured code.
"""

from __future__ import annotations

import io
from typing import Any

from veil.errors import Unavailable

READ_CHUNK = 1 << 20


class ResumableBlob(io.BufferedIOBase):
    """Subclasses implement `_request()`: (re)open the stream at `self._pos`, bound to
    `self._etag` once known, setting `self._size`, `self._etag` and `self._stream` (or leaving
    `self._stream` None when the offset is exactly the end). `_STREAM_ERRORS` are the exceptions
    a read of the open stream may raise that a resume can fix."""

    _STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, where: str, resumes: int, offset: int = 0) -> None:
        super().__init__()
        if type(offset) is not int or offset < 0:
            raise ValueError("offset must be a non-negative integer")
        self._where = where
        self._pos = offset
        self._size: int | None = None
        self._etag: str | None = None
        self._stream: Any = None
        self._resumes_left = resumes

    @property
    def size(self) -> int | None:
        """The whole file's size, as the store declared it."""
        return self._size

    def readable(self) -> bool:
        return True

    def _request(self) -> None:
        raise NotImplementedError

    def _changed(self) -> Unavailable:
        return Unavailable(f"{self._where} changed in the model store while it was being read", code="store_changed")

    def _resume(self, cause: BaseException | None) -> None:
        if self._resumes_left <= 0:
            self._drop()
            why = type(cause).__name__ if cause else "stream ended early"
            raise Unavailable(f"{self._where}: reading failed at byte {self._pos} ({why})", code="store_unavailable")
        self._resumes_left -= 1
        self._request()

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed sealed-model stream")
        assert self._size is not None
        want = self._size - self._pos if size is None or size < 0 else min(size, self._size - self._pos)
        out = bytearray()
        while len(out) < want:
            if self._stream is None:
                self._resume(None)
                continue
            try:
                chunk = self._stream.read(min(want - len(out), READ_CHUNK))
            except self._STREAM_ERRORS as exc:
                self._resume(exc)
                continue
            if not chunk:
                self._resume(None)
                continue
            out += chunk
            self._pos += len(chunk)
        return bytes(out)

    def read1(self, size: int = -1) -> bytes:
        return self.read(READ_CHUNK if size is None or size < 0 else min(size, READ_CHUNK))

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()
