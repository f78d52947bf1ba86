"""Symmetric key objects that never reveal themselves in a repr, a log or a traceback."""

from __future__ import annotations

import hmac
import os

from veil.crypto.errors import MalformedError

KEY_BYTES = 32


class SymmetricKey:
    """A 256-bit secret key. `repr` and `str` print only a non-secret fingerprint prefix."""

    __slots__ = ("_material",)

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, bytes | bytearray) or len(material) != KEY_BYTES:
            raise MalformedError("key", f"must be {KEY_BYTES} bytes")
        self._material = bytes(material)

    @classmethod
    def generate(cls) -> SymmetricKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(os.urandom(KEY_BYTES))

    def material(self) -> bytes:
        """The raw bytes, for the few places that must hand them to a cipher or seal them."""
        return self._material

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SymmetricKey) and hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(("SymmetricKey", self._material[:8]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<secret>)"

    __str__ = __repr__

    def __reduce__(self):  # pragma: no cover - guard against accidental pickling to disk
        raise TypeError("secret keys cannot be pickled")
