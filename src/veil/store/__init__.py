"""The sealed-model store: one interface over sealed, versioned blobs, several places to keep them.

- `base`: the interface (`ModelReader`, `ModelStore`, `Upload`), shared by all of them;
- `local`: a directory (`LocalModelStore`), the embedded default;
- `remote`: `HttpModelReader`, how a runtime on any node reads `veil store serve`;
- `client`: `HttpModelStore` (the writer side of the HTTP service) and `open_store`;
- `server`: `veil store serve`, the untrusted HTTP blob service (over a directory or S3);
- `s3`: `S3ModelStore`, an S3-compatible adapter (the optional extra `veil[s3]`).

The runtime is measured code and imports this package, so it pulls in only the reader side
(`base`, `local`, `remote`); `client`, `server` and `s3` are imported by their users directly.
"""

from __future__ import annotations

from pathlib import Path

from veil.errors import BadRequest
from veil.store.base import HEAD_BYTES, SUFFIX, BlobInfo, ModelReader, ModelStore, Upload, check_version
from veil.store.local import LocalModelStore, PendingUpload
from veil.store.remote import HttpModelReader

__all__ = [
    "HEAD_BYTES",
    "SUFFIX",
    "BlobInfo",
    "HttpModelReader",
    "LocalModelStore",
    "ModelReader",
    "ModelStore",
    "PendingUpload",
    "Upload",
    "check_version",
    "open_reader",
]


def open_reader(location: str) -> ModelReader:
    """The store a runtime reads, from its init value's `store`: a directory on this node, or the
    `http(s)://` URL of `veil store serve`. Either must exist: a missing directory or an
    unreachable service is `Unavailable(code="no_store")`, never an empty store."""
    if not isinstance(location, str) or not location:
        raise BadRequest("store: must be a directory or an http(s):// URL", code="bad_init")
    if location.startswith(("http://", "https://")):
        try:
            return HttpModelReader(location)
        except ValueError as exc:
            raise BadRequest(f"store: {exc}", code="bad_init") from None
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise BadRequest(
            f"store: a runtime reads a directory or an http(s):// store service, not {scheme}:// "
            "(serve that store with `veil store serve --backend ...` and give its URL)",
            code="bad_init",
        )
    return LocalModelStore(Path(location))
