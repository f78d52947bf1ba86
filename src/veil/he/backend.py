"""The CKKS operations the HE evaluator and client need, as one small interface.

The evaluator (`server`) and client (`client`) talk only to this protocol, so a second library
(OpenFHE, Lattigo via a service, a GPU backend) can be added by implementing it; `seal_backend`
is the SEAL 4.1 implementation. Ciphertexts, plaintexts and keys are opaque objects owned by the
backend; only `serialize`/`load_*` cross the wire.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Ciphertext = Any
Plaintext = Any


class CKKSBackend(Protocol):
    """One parameter set's context: encoding, evaluation and (de)serialization."""

    slot_count: int
    levels: int  # number of data primes a fresh ciphertext carries

    def encode(self, values: np.ndarray | float, scale: float, level: int) -> Plaintext:
        """Encode a real or complex vector (or a constant in every slot) at `level` (0 = fresh)."""

    def decode(self, plain: Plaintext, complex_slots: bool = False) -> np.ndarray:
        """Slot values; complex when the plaintext packs coefficients (see `slots`)."""

    def prime(self, level: int) -> int:
        """The prime a rescale at `level` drops (the last data prime at that level)."""

    def add(self, a: Ciphertext, b: Ciphertext) -> Ciphertext: ...

    def add_inplace(self, a: Ciphertext, b: Ciphertext) -> None: ...

    def add_plain_inplace(self, a: Ciphertext, p: Plaintext) -> None: ...

    def multiply_plain(self, a: Ciphertext, p: Plaintext) -> Ciphertext: ...

    def sub(self, a: Ciphertext, b: Ciphertext) -> Ciphertext: ...

    def negate_inplace(self, a: Ciphertext) -> None: ...

    def conjugate(self, a: Ciphertext, galois_keys: Any) -> Ciphertext:
        """Complex conjugate of every slot: splits the two samples a throughput slot carries."""

    def multiply(self, a: Ciphertext, b: Ciphertext) -> Ciphertext: ...

    def square(self, a: Ciphertext) -> Ciphertext: ...

    def relinearize_inplace(self, a: Ciphertext, relin_keys: Any) -> None: ...

    def rescale_inplace(self, a: Ciphertext) -> None: ...

    def rotate(self, a: Ciphertext, step: int, galois_keys: Any) -> Ciphertext:
        """Cyclic left rotation of the slot vector by `step` (negative = right)."""

    def galois_element(self, step: int) -> int:
        """3**step mod 2N: the Galois element a rotation by `step` applies."""

    def scale(self, a: Ciphertext) -> float: ...

    def size(self, a: Ciphertext) -> int:
        """Polynomials in the ciphertext: 3 after a product not yet relinearized."""

    def level(self, a: Ciphertext) -> int: ...

    def serialize(self, obj: Any) -> bytes: ...

    def load_ciphertext(self, data: bytes, level: int, scale: float) -> Ciphertext:
        """Parse untrusted bytes; raise HEError unless they are a ciphertext of this context."""

    def load_eval_keys(self, relin: bytes | None, galois: bytes | None, elements: list[int]) -> Any:
        """Parse untrusted evaluation keys; raise HEError unless valid for this context."""
