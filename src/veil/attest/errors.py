"""Attestation failures. Each names the field that failed, and expected/actual where it helps."""

from __future__ import annotations


class AttestationError(Exception):
    """Base class: `field` is what failed, `reason` why."""

    def __init__(self, field: str, reason: str, *, expected: object = None, actual: object = None) -> None:
        detail = f"{field}: {reason}"
        if expected is not None or actual is not None:
            detail += f" (expected {expected!r}, got {actual!r})"
        super().__init__(detail)
        self.field = field
        self.reason = reason
        self.expected = expected
        self.actual = actual


class VerificationError(AttestationError):
    """The evidence is not genuine: bad signature, broken chain, expired or revoked collateral."""


class PolicyError(AttestationError):
    """The evidence is genuine but not acceptable: wrong measurement, debug, stale TCB, binding."""
