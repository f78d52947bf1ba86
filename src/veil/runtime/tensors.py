"""Named tensors ↔ bytes: the plaintext inside request and response envelopes.

Layout: magic "VTN1" ‖ u32 header length ‖ JSON header {"tensors": [{"name", "dtype", "shape"}]}
‖ raw C-order data of each tensor in header order. No pickle, no zip: a parser that checks
every dtype, shape and length before it touches the data.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from veil.crypto.errors import MalformedError

MAGIC = b"VTN1"
DTYPES = {"float32", "float64", "int64", "int32", "int8", "uint8", "bool", "float16"}
MAX_HEADER = 64 * 1024
MAX_DIMS = 8


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialise named arrays (dtype must be one of DTYPES)."""
    header, blobs = [], []
    for name, array in tensors.items():
        arr = np.ascontiguousarray(array)
        if arr.dtype.name not in DTYPES:
            raise MalformedError(f"tensors.{name}", f"dtype {arr.dtype.name} not supported")
        header.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        blobs.append(arr.tobytes())
    head = json.dumps({"tensors": header}, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Parse `encode`'s output, naming the tensor and field at fault on any inconsistency."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedError("tensors", "not a Veil tensor payload (bad magic)")
    (length,) = struct.unpack(">I", data[4:8])
    if length > MAX_HEADER or 8 + length > len(data):
        raise MalformedError("tensors", "header length out of range")
    try:
        header = json.loads(data[8 : 8 + length])
        entries = header["tensors"]
    except (ValueError, KeyError, TypeError):
        raise MalformedError("tensors", "header is not valid JSON with a 'tensors' list") from None
    if not isinstance(entries, list):
        raise MalformedError("tensors", "'tensors' must be a list")
    offset = 8 + length
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedError("tensors", "each tensor entry must be an object")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not isinstance(name, str) or name in out:
            raise MalformedError("tensors.name", "missing or duplicate tensor name")
        if dtype not in DTYPES:
            raise MalformedError(f"tensors.{name}.dtype", f"must be one of {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise MalformedError(f"tensors.{name}.shape", f"must be a list of ≤ {MAX_DIMS} non-negative ints")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + nbytes > len(data):
            raise MalformedError(f"tensors.{name}", "data shorter than its shape requires")
        out[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset).reshape(
            shape
        )
        offset += nbytes
    if offset != len(data):
        raise MalformedError("tensors", f"{len(data) - offset} trailing bytes after the last tensor")
    return out
