"""An HE model as one blob: what an owner publishes through the gateway and a store keeps.

`veil he compile` writes a directory (manifest, plan, weights, client spec); publishing packs it
into one versioned blob so that it travels, is signed and is stored exactly like a sealed TEE
model: `PUT /v1/models/{model}/versions/{version}/he` for HE mode (the weights in clear: HE
hides inputs and outputs, not the model), or sealed with the model key
(`veil.crypto.chunked`) for hybrid mode, where only an attested runtime can open it.

Layout: b"VEILHEM1" | u32 big-endian header length | JSON header | the files' bytes in header
order. The header names the model and each file's length, so a blob put under another model is
refused; the version is bound by the owner's upload signature (HE mode) or by the sealing
(hybrid mode), because the KeyService names it only after the blob's digest is staged.
Unpacking never touches the disk: a hybrid runtime holds the decrypted weights in memory only.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

from veil.he.compiled import CompiledModel
from veil.he.errors import HEError
from veil.wire.blobs import HE_MODEL_MAGIC

MAGIC = HE_MODEL_MAGIC
FILES = ("manifest.json", "plan.json", "weights.npz", "client.json")
MAX_HEADER = 64 * 1024


def is_bundle(data: bytes | bytearray | memoryview) -> bool:
    """Does `data` start like an HE model blob (not an ONNX or ORT model)?"""
    return len(data) >= len(MAGIC) and bytes(data[: len(MAGIC)]) == MAGIC


def pack(compiled: CompiledModel, model: str) -> bytes:
    """The blob of `compiled` as model `model` (owner side)."""
    compiled.name = model
    with tempfile.TemporaryDirectory(prefix="veil-he-pack-") as tmp:
        directory = compiled.save(Path(tmp))
        parts = [(name, (directory / name).read_bytes()) for name in FILES]
    header = json.dumps({"v": 1, "model": model, "files": [[n, len(b)] for n, b in parts]}, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + b"".join(b for _, b in parts)


def read_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The blob's header (model, files); HEError("bad_model") for anything else."""
    if not is_bundle(data) or len(data) < len(MAGIC) + 4:
        raise HEError("bad_model", "not a Veil HE model blob")
    (hlen,) = struct.unpack_from(">I", bytes(data[len(MAGIC) : len(MAGIC) + 4]))
    start = len(MAGIC) + 4
    if hlen > MAX_HEADER or start + hlen > len(data):
        raise HEError("bad_model", "HE model blob header is truncated")
    try:
        header = json.loads(bytes(data[start : start + hlen]))
    except ValueError:
        raise HEError("bad_model", "HE model blob header is not JSON") from None
    files = header.get("files") if isinstance(header, dict) else None
    if (
        not isinstance(header, dict)
        or header.get("v") != 1
        or not isinstance(header.get("model"), str)
        or not isinstance(files, list)
        or [f[0] if isinstance(f, list) and len(f) == 2 else None for f in files] != list(FILES)
        or not all(type(f[1]) is int and f[1] >= 0 for f in files)
    ):
        raise HEError("bad_model", "HE model blob header lacks its model or files")
    header["_body"] = start + hlen
    return header


class _MemFile(io.BytesIO):
    def read_text(self) -> str:
        return self.getvalue().decode()


class _MemDir:
    """What `CompiledModel.load` reads a directory through, held in memory."""

    def __init__(self, name: str, files: dict[str, bytes]) -> None:
        self.name = name
        self._files = files

    def __truediv__(self, name: str) -> _MemFile:
        if name not in self._files:
            raise OSError(f"{name} is not in the blob")
        return _MemFile(self._files[name])


def unpack(data: bytes | bytearray | memoryview, model: str) -> CompiledModel:
    """The compiled model in a blob, checked to be `model`, read in memory."""
    header = read_header(data)
    if header["model"] != model:
        raise HEError("model_integrity", f"HE model blob is {header['model']!r}, not {model!r}", 403)
    offset = header["_body"]
    files = {}
    for name, length in header["files"]:
        files[name] = bytes(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise HEError("bad_model", "HE model blob is truncated or has trailing bytes")
    return CompiledModel.load(_MemDir(model, files))  # type: ignore[arg-type]
