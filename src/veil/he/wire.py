"""JSON wire formats of HE mode (version 1), binary fields in base64url.

Upload evaluation keys (gateway `POST /v1/he/keys`, action value `{"op": "upload_keys", ...}`):

    request  {"v": 1, "model": str, "keys": b64url(eval-key blob)}
    response {"v": 1, "key_id": hex sha256(blob), "cached": bool, "bytes": int}

Encrypted inference (gateway `POST /v1/he/models/{model}:infer`, action value
`{"op": "infer", "model": ..., ...}`):

    request  {"v": 1, "model": str, "key_id": hex, "packing": "latency" | "throughput",
              "batch": int, "features": int, "ciphertexts": [b64url(SEAL ciphertext), ...]}
    response {"v": 1, "model": str, "key_id": hex, "packing": str, "batch": int,
              "ciphertexts": [b64url(SEAL ciphertext), ...], "eval_ms": float}

The eval-key blob is `keys.pack_eval_keys` (magic, JSON header, SEAL relin/Galois keys). Every
parser here checks types and sizes and raises HEError("bad_request") naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from veil.crypto.encoding import b64d, b64e
from veil.crypto.errors import MalformedError
from veil.he.errors import HEError
from veil.he.packing import PACKINGS

VERSION = 1
MAX_CIPHERTEXTS = 4096
MAX_BATCH = 1 << 20  # samples per request: far above what MAX_CIPHERTEXTS can carry
MAX_FEATURES = 1 << 16
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_ID = re.compile(r"^[0-9a-f]{64}$")


def _field(value: dict, name: str, kind: type) -> Any:
    if name not in value:
        raise HEError("bad_request", f"missing field {name!r}")
    item = value[name]
    if kind is int and (isinstance(item, bool) or not isinstance(item, int)):
        raise HEError("bad_request", f"field {name!r} must be an integer")
    if kind is not int and not isinstance(item, kind):
        raise HEError("bad_request", f"field {name!r} must be a {kind.__name__}")
    return item


def _bounded(value: dict, name: str, hi: int) -> int:
    """A positive integer field no larger than `hi` (checked before anything is computed with it)."""
    item = _field(value, name, int)
    if not 1 <= item <= hi:
        raise HEError("bad_request", f"field {name!r} must be an integer in [1, {hi}]")
    return item


def _milliseconds(item: Any) -> float:
    """A reported duration, or 0.0 for anything that is not a finite, sane number."""
    if isinstance(item, bool) or not isinstance(item, int | float):
        return 0.0
    if isinstance(item, int) and not 0 <= item < 10**12:
        return 0.0
    return float(item) if math.isfinite(item) and 0 <= item < 1e12 else 0.0


def _version(value: Any) -> None:
    if not isinstance(value, dict):
        raise HEError("bad_request", "request body must be a JSON object")
    if value.get("v") != VERSION:
        raise HEError("bad_request", f"unsupported version {value.get('v')!r}; this server speaks v{VERSION}")


def check_model_id(model: Any) -> str:
    if not isinstance(model, str) or not MODEL_ID.match(model):
        raise HEError("bad_request", "model id must be 1-64 characters of [A-Za-z0-9._-]")
    return model


def _b64(text: Any, name: str) -> bytes:
    try:
        return b64d(text, name)
    except MalformedError as exc:
        raise HEError("bad_request", str(exc)) from None


@dataclass(frozen=True)
class UploadKeys:
    model: str
    keys: bytes

    def to_json(self) -> dict[str, Any]:
        return {"v": VERSION, "model": self.model, "keys": b64e(self.keys)}

    @classmethod
    def parse(cls, value: Any, max_bytes: int) -> UploadKeys:
        _version(value)
        model = check_model_id(_field(value, "model", str))
        text = _field(value, "keys", str)
        if len(text) > max_bytes * 4 // 3 + 4:
            raise HEError("bad_request", f"keys exceed {max_bytes} bytes", 413)
        return cls(model, _b64(text, "keys"))


@dataclass(frozen=True)
class InferRequest:
    model: str
    key_id: str
    packing: str
    batch: int
    features: int
    ciphertexts: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "model": self.model,
            "key_id": self.key_id,
            "packing": self.packing,
            "batch": self.batch,
            "features": self.features,
            "ciphertexts": [b64e(c) for c in self.ciphertexts],
        }

    @classmethod
    def parse(cls, value: Any, max_ct_bytes: int) -> InferRequest:
        _version(value)
        model = check_model_id(_field(value, "model", str))
        key_id = _field(value, "key_id", str)
        if not KEY_ID.match(key_id):
            raise HEError("bad_request", "key_id must be 64 lowercase hex digits")
        packing = _field(value, "packing", str)
        if packing not in PACKINGS:
            raise HEError("bad_request", f"packing must be one of {list(PACKINGS)}")
        batch = _bounded(value, "batch", MAX_BATCH)
        features = _bounded(value, "features", MAX_FEATURES)
        items = _field(value, "ciphertexts", list)
        if not items or len(items) > MAX_CIPHERTEXTS:
            raise HEError("bad_request", f"between 1 and {MAX_CIPHERTEXTS} ciphertexts per request")
        cts = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or len(item) > max_ct_bytes * 4 // 3 + 4:
                raise HEError("bad_ciphertext", f"ciphertexts[{i}] is not a string of at most {max_ct_bytes} bytes")
            cts.append(_b64(item, f"ciphertexts[{i}]"))
        return cls(model, key_id, packing, batch, features, cts)


@dataclass(frozen=True)
class InferResponse:
    model: str
    key_id: str
    packing: str
    batch: int
    ciphertexts: list[bytes]
    eval_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "model": self.model,
            "key_id": self.key_id,
            "packing": self.packing,
            "batch": self.batch,
            "ciphertexts": [b64e(c) for c in self.ciphertexts],
            "eval_ms": round(self.eval_ms, 3),
        }

    @classmethod
    def parse(cls, value: Any) -> InferResponse:
        _version(value)
        eval_ms = value.get("eval_ms", 0.0)
        items = _field(value, "ciphertexts", list)
        if len(items) > MAX_CIPHERTEXTS or not all(isinstance(c, str) for c in items):
            raise HEError("bad_response", f"ciphertexts: at most {MAX_CIPHERTEXTS} strings")
        cts = [_b64(c, "ciphertexts") for c in items]
        return cls(
            _field(value, "model", str),
            _field(value, "key_id", str),
            _field(value, "packing", str),
            _bounded(value, "batch", MAX_BATCH),
            cts,
            _milliseconds(eval_ms),
        )
