"""The key-release rule, as one pure function so it can be read, tested and audited alone.

A key is released only when: the model exists and has a key; the user is granted and not
revoked; the user has put a request key; and the attested measurement is allowed by the owner's
set AND by the user's set. (SeSeMI, as released, checked no measurement at all.)
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.attest import validate
from veil.attest.evidence import VerifiedReport


@dataclass(frozen=True)
class ReleaseFacts:
    model_exists: bool
    model_has_key: bool
    owner_measurements: list[str]
    granted: bool
    has_request_key: bool
    user_measurements: list[str]


def allowed_by(report: VerifiedReport, entries: list[str]) -> bool:
    """True if any allow-list entry matches the attested report."""
    return any(validate.matches(report, entry) for entry in entries)


def release_refusal(report: VerifiedReport, facts: ReleaseFacts) -> tuple[str, str] | None:
    """None if the release is allowed, else (error code, reason)."""
    if not facts.model_exists:
        return "unknown_model", "no such model"
    if not facts.model_has_key:
        return "no_model_key", "the owner has not registered a model key"
    if not facts.granted:
        return "not_granted", "the user is not granted this model (or was revoked)"
    if not facts.has_request_key:
        return "no_request_key", "the user has not registered a request key for this model"
    if not allowed_by(report, facts.owner_measurements):
        return (
            "measurement_refused_by_owner",
            f"runtime measurement {report.measurement} is not allowed by the model owner",
        )
    if not allowed_by(report, facts.user_measurements):
        return "measurement_refused_by_user", f"runtime measurement {report.measurement} is not allowed by the user"
    return None
