"""Veil's cryptographic building blocks.

Misuse-resistant in the Tink manner: callers pass plaintext and associated data, never a nonce;
keys are objects that never print themselves. Depends on nothing else in Veil.
"""

from veil.crypto.errors import CryptoError, IntegrityError, MalformedError

__all__ = ["CryptoError", "IntegrityError", "MalformedError"]
