"""The plaintexts inside request and response envelopes: named tensors, or an error.

Tensors payload (request and successful response):

    "VTN1" ‖ u32be header_len ‖ header (UTF-8 JSON object) ‖ raw C-order data of each tensor,
    in header order

    header = {"tensors": [{"name": str, "dtype": one of DTYPES, "shape": [int ≥ 0, ≤ 8 dims]}, ...],
              "options": {"timings": bool},      optional, requests only
              "timings": {str: number | bool}}   optional, responses to a request that asked

Error payload (a response that answers with an error, once the request authenticated):

    "VER1" ‖ u32be body_len ‖ body (UTF-8 JSON) and nothing after it

    body = {"error": {"code": str, "message": str}}   (the standard error body, with the detail
                                                        that never travels in clear)

The magics ("VTN1", "VER1") tell the two apart before any parsing. No pickle, no zip: parsers
that check every dtype, shape, length and field before they touch the data, naming the field at
fault. A header over 64 KiB and unknown header fields or options are refused.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.crypto.errors import MalformedError

MAGIC = b"VTN1"
ERROR_MAGIC = b"VER1"
DTYPES = {"float32", "float64", "int64", "int32", "int8", "uint8", "bool", "float16"}
MAX_HEADER = 64 * 1024
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 31  # checked before anything is allocated or viewed
MAX_ERROR_MESSAGE = 4096
_HEADER_FIELDS = {"tensors", "options", "timings"}
_OPTIONS = {"timings"}
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class RequestOptions:
    """What a user asked of the runtime inside the request plaintext."""

    timings: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"timings": self.timings}


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def encode(
    tensors: dict[str, np.ndarray],
    *,
    options: RequestOptions | None = None,
    timings: dict[str, float | int | bool] | None = None,
) -> bytes:
    """Serialise named arrays (dtype must be one of DTYPES), with request `options` or response
    `timings` in the header when given."""
    header: dict[str, Any] = {}
    entries, blobs = [], []
    for name, array in tensors.items():
        arr = np.ascontiguousarray(array)
        if arr.dtype.name not in DTYPES:
            raise MalformedError(f"tensors.{name}", f"dtype {arr.dtype.name} not supported")
        entries.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
        blobs.append(arr.tobytes())
    header["tensors"] = entries
    if options is not None:
        header["options"] = options.to_json()
    if timings is not None:
        header["timings"] = _check_timings(timings)
    head = _dumps(header)
    if len(head) > MAX_HEADER:
        raise MalformedError("tensors", "header too large")
    return MAGIC + struct.pack(">I", len(head)) + head + b"".join(blobs)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """Parse `encode`'s output, naming the tensor and field at fault on any inconsistency."""
    return decode_with_meta(data)[0]


def decode_with_meta(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, header fields other than `tensors`, i.e. `options` and/or `timings`, checked)."""
    if len(data) < 8 or data[:4] != MAGIC:
        if data[:4] == ERROR_MAGIC:
            raise MalformedError("tensors", "an error payload, not a tensor payload")
        raise MalformedError("tensors", "not a Veil tensor payload (bad magic)")
    (length,) = struct.unpack(">I", data[4:8])
    if length > MAX_HEADER or 8 + length > len(data):
        raise MalformedError("tensors", "header length out of range")
    try:
        header = json.loads(data[8 : 8 + length])
        entries = header["tensors"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MalformedError("tensors", "header is not valid JSON with a 'tensors' list") from None
    if not isinstance(header, dict):
        raise MalformedError("tensors", "header must be a JSON object")
    unknown = header.keys() - _HEADER_FIELDS
    if unknown:
        raise MalformedError("tensors", f"unknown header fields {sorted(unknown)}")
    if not isinstance(entries, list):
        raise MalformedError("tensors", "'tensors' must be a list")
    meta: dict[str, Any] = {}
    if "options" in header:
        meta["options"] = _parse_options(header["options"])
    if "timings" in header:
        meta["timings"] = _check_timings(header["timings"])
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
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise MalformedError(f"tensors.{name}.shape", f"must be a list of ≤ {MAX_DIMS} non-negative ints")
        count = math.prod(shape)  # Python ints: a hostile [2**32, 2**32] cannot wrap around to 0
        if count > MAX_ELEMENTS:
            raise MalformedError(f"tensors.{name}.shape", f"at most {MAX_ELEMENTS} elements per tensor")
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > len(data):
            raise MalformedError(f"tensors.{name}", "data shorter than its shape requires")
        out[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=offset).reshape(
            shape
        )
        offset += nbytes
    if offset != len(data):
        raise MalformedError("tensors", f"{len(data) - offset} trailing bytes after the last tensor")
    return out, meta


def request_options(meta: dict[str, Any]) -> RequestOptions:
    """The options of a decoded request (defaults when it carried none)."""
    return meta.get("options") or RequestOptions()


def _parse_options(value: object) -> RequestOptions:
    if not isinstance(value, dict):
        raise MalformedError("options", "must be a JSON object")
    unknown = value.keys() - _OPTIONS
    if unknown:
        raise MalformedError("options", f"unknown options {sorted(unknown)}")
    timings = value.get("timings", False)
    if not isinstance(timings, bool):
        raise MalformedError("options.timings", "must be true or false")
    return RequestOptions(timings=timings)


def _check_timings(value: object) -> dict[str, float | int | bool]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float | bool) for k, v in value.items()
    ):
        raise MalformedError("timings", "must map names to numbers")
    return dict(value)


# -- errors ---------------------------------------------------------------------------------------


def encode_error(code: str, message: str) -> bytes:
    """The plaintext of an encrypted error answer: `ERROR_MAGIC ‖ u32be len ‖ {"error": {...}}`."""
    if not _CODE.match(code):
        raise MalformedError("error.code", "must be 1-64 characters of a-z 0-9 _, starting with a letter")
    body = _dumps({"error": {"code": code, "message": message[:MAX_ERROR_MESSAGE]}})
    return ERROR_MAGIC + struct.pack(">I", len(body)) + body


def is_error(data: bytes) -> bool:
    """Whether a decrypted response plaintext is an error payload (checks the magic only)."""
    return data[:4] == ERROR_MAGIC


def decode_error(data: bytes) -> tuple[str, str]:
    """(code, message) of an error payload; MalformedError("error", ...) if it is not one."""
    if len(data) < 8 or data[:4] != ERROR_MAGIC:
        raise MalformedError("error", "not a Veil error payload (bad magic)")
    (length,) = struct.unpack(">I", data[4:8])
    if length > MAX_HEADER or 8 + length != len(data):
        raise MalformedError("error", "length out of range or trailing bytes")
    try:
        err = json.loads(data[8:])["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MalformedError("error", 'body is not {"error": {"code", "message"}}') from None
    if not isinstance(code, str) or not _CODE.match(code) or not isinstance(message, str):
        raise MalformedError("error", "code and message must be strings")
    return code, message


# Hybrid mode (HE evaluated inside the attested runtime): the envelope's tensors are one uint8
# tensor each way holding the HE wire JSON (`veil.he.wire`): CKKS ciphertexts under the user's key.
HYBRID_REQUEST = "he_request"
HYBRID_RESPONSE = "he_response"
