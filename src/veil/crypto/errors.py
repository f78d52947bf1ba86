"""Exceptions raised by `veil.crypto`; the HTTP layers map them to status codes."""


class CryptoError(Exception):
    """Base class for every cryptographic failure."""


class IntegrityError(CryptoError):
    """Authentication failed: the data was tampered with, truncated, reordered or mis-keyed."""


class MalformedError(CryptoError, ValueError):
    """The input does not parse: wrong length, bad encoding, unknown version.

    `field` names the part of the input that is wrong, so callers can report it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
