"""Veil's service errors: a code, an HTTP status and a message safe to show a user.

`crypto` and `attest` keep their own exceptions (they depend on nothing of Veil's);
`from_exception` maps those here so every HTTP layer answers `{"error": {"code", "message"}}`.
"""

from __future__ import annotations


class VeilError(Exception):
    """An expected failure with a stable machine-readable `code` and an HTTP `status`."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(VeilError):
    code, status = "bad_request", 400


class Unauthorized(VeilError):
    code, status = "unauthorized", 401


class Forbidden(VeilError):
    code, status = "forbidden", 403


class NotFound(VeilError):
    code, status = "not_found", 404


class Conflict(VeilError):
    code, status = "conflict", 409


class TooLarge(VeilError):
    code, status = "too_large", 413


class Busy(VeilError):
    code, status = "busy", 503


class Unavailable(VeilError):
    code, status = "unavailable", 503


class StoreIntegrityError(VeilError):
    code, status = "store_integrity", 500


def from_exception(exc: BaseException) -> VeilError:
    """Translate lower-layer exceptions into a VeilError without leaking internals."""
    from veil.attest.errors import AttestationError, PolicyError
    from veil.crypto.errors import IntegrityError, MalformedError

    if isinstance(exc, VeilError):
        return exc
    if isinstance(exc, MalformedError):
        return BadRequest(str(exc), code="malformed")
    if isinstance(exc, IntegrityError):
        return BadRequest(f"integrity check failed: {exc}", code="integrity")
    if isinstance(exc, PolicyError):
        return Forbidden(f"attestation policy: {exc}", code="attestation_refused")
    if isinstance(exc, AttestationError):
        return Forbidden(f"attestation: {exc}", code="attestation_failed")
    return VeilError("internal error", code="internal", status=500)
