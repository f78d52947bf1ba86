"""Model cards: the public, owner-signed description of one model version.

A card says what a model is and how to call it: model id, version, mode (TEE, HE, hybrid), the
names, dtypes and shapes of its inputs and outputs, and a description. The owner signs it
(Ed25519 over `veil-card-v1\\n` ‖ canonical JSON); the KeyService keeps it beside the version and
anyone may fetch it through the gateway, but a user believes it only after checking the
signature against the owner's key, obtained over the KeyService's signed-answer channel, and
that it names the current version. Clients use it to name, shape and type inputs, and to explain
a mismatch before anything is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.errors import CryptoError, MalformedError
from veil.crypto.identity import Identity, principal_id, verify_signature

CONTEXT = b"veil-card-v1\n"
MODES = ("tee", "he", "hybrid")
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool")
MAX_CARD_BYTES = 16 * 1024
MAX_TENSORS = 64
_NAME = re.compile(r"^[^\x00-\x1f]{1,128}$")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `shape` entries are sizes, or None for a free (batch) dimension."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def describe(self) -> str:
        dims = ", ".join("batch" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} [{dims}]"


@dataclass(frozen=True)
class ModelCard:
    model: str
    version: int
    mode: str
    owner: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # mode-specific public facts (e.g. HE spec id)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "model": self.model,
            "version": self.version,
            "mode": self.mode,
            "owner": self.owner,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "description": self.description,
            "extra": self.extra,
        }

    def payload(self) -> bytes:
        """The exact bytes the owner signs."""
        return CONTEXT + canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object) -> ModelCard:
        if not isinstance(obj, dict):
            raise MalformedError("card", "must be a JSON object")
        if type(obj.get("v")) is not int or obj["v"] != 1:
            raise MalformedError("card.v", "unsupported card version")
        unknown = obj.keys() - {"v", "model", "version", "mode", "owner", "inputs", "outputs", "description", "extra"}
        if unknown:
            raise MalformedError("card", f"unknown fields {sorted(unknown)}")
        model, version, mode, owner = obj.get("model"), obj.get("version"), obj.get("mode"), obj.get("owner")
        if not isinstance(model, str) or not model:
            raise MalformedError("card.model", "must be a model id")
        if type(version) is not int or version < 1:
            raise MalformedError("card.version", "must be a positive integer")
        if mode not in MODES:
            raise MalformedError("card.mode", f"must be one of {list(MODES)}")
        if not isinstance(owner, str) or len(owner) != 64:
            raise MalformedError("card.owner", "must be the owner's principal id")
        description = obj.get("description", "")
        if not isinstance(description, str) or len(description) > 4000:
            raise MalformedError("card.description", "must be text of at most 4000 characters")
        extra = obj.get("extra", {})
        if not isinstance(extra, dict):
            raise MalformedError("card.extra", "must be an object")
        return cls(
            model,
            version,
            mode,
            owner,
            _specs(obj.get("inputs"), "inputs"),
            _specs(obj.get("outputs"), "outputs"),
            description,
            extra,
        )


def _specs(value: object, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list) or len(value) > MAX_TENSORS:
        raise MalformedError(f"card.{where}", f"must be a list of at most {MAX_TENSORS} tensors")
    specs = []
    for i, entry in enumerate(value):
        at = f"card.{where}[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise MalformedError(at, "must be {name, dtype, shape}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise MalformedError(f"{at}.name", "must be 1-128 printable characters")
        if dtype not in DTYPES:
            raise MalformedError(f"{at}.dtype", f"must be one of {list(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(d is None or (type(d) is int and 0 <= d < 1 << 40) for d in shape)
        ):
            raise MalformedError(f"{at}.shape", "must be a list of ≤ 8 sizes or null (free dimension)")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)


def sign_card(identity: Identity, card: ModelCard) -> dict[str, Any]:
    """The signed card as it travels: {"card": ..., "signature": b64url}."""
    if card.owner != identity.id:
        raise MalformedError("card.owner", "a card is signed by the owner it names")
    return {"card": card.to_json(), "signature": b64e(identity.sign(card.payload()))}


def verify_card(signed: object, owner_public_key: bytes) -> ModelCard:
    """Parse a signed card and check it is the named owner's; MalformedError names what failed."""
    if not isinstance(signed, dict) or set(signed) != {"card", "signature"}:
        raise MalformedError("signed_card", "must be {card, signature}")
    card = ModelCard.from_json(signed["card"])
    if principal_id(owner_public_key) != card.owner:
        raise MalformedError("card.owner", "is not the principal whose key verifies it")
    try:
        verify_signature(owner_public_key, card.payload(), b64d(signed["signature"], "signature"))
    except CryptoError:
        raise MalformedError("signature", "does not verify under the owner's key") from None
    return card


def mismatches(card: ModelCard, arrays: dict[str, Any]) -> list[str]:
    """Why `arrays` (name → array-like with .dtype and .shape) do not fit the card's inputs, one
    line per problem (`input_ids: expected int64 [batch, 128], got float32 [1, 7]`)."""
    problems = []
    want = {t.name: t for t in card.inputs}
    for name in sorted(arrays.keys() - want.keys()):
        problems.append(f"{name}: the model has no such input (inputs: {', '.join(sorted(want))})")
    for name, spec in want.items():
        if name not in arrays:
            problems.append(f"{name}: missing, expected {spec.describe()}")
            continue
        arr = arrays[name]
        got = f"{arr.dtype} [{', '.join(str(d) for d in arr.shape)}]"
        fits = (
            str(arr.dtype) == spec.dtype
            and len(arr.shape) == len(spec.shape)
            and all(w is None or w == g for w, g in zip(spec.shape, arr.shape, strict=False))
        )
        if not fits:
            problems.append(f"{name}: expected {spec.describe()}, got {got}")
    return problems
