"""Sealing records at rest: AES-256-GCM under a sealing key, AAD = the record's key.

Binding the record key as AAD means a sealed value copied to another row (say, one user's request
key pasted over another's) fails to open.
"""

from __future__ import annotations

from veil.crypto import aead
from veil.crypto.keys import SymmetricKey

AT_REST_CONTEXT = b"veil-at-rest-v1:"


class Sealer:
    """Seals and opens records under one sealing key."""

    __slots__ = ("_key",)

    def __init__(self, sealing_key: SymmetricKey) -> None:
        self._key = sealing_key

    def seal(self, record_key: str, plaintext: bytes) -> bytes:
        return aead.encrypt(self._key, plaintext, AT_REST_CONTEXT + record_key.encode())

    def open(self, record_key: str, sealed: bytes) -> bytes:
        return aead.decrypt(self._key, sealed, AT_REST_CONTEXT + record_key.encode())

    def __repr__(self) -> str:
        return "Sealer(<secret>)"
