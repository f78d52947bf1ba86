"""Policy over a verified report (go-sev-guest's `validate`). Every refusal names the field."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field

from veil.attest.errors import PolicyError
from veil.attest.evidence import VerifiedReport

log = logging.getLogger("veil.attest.validate")


@dataclass(frozen=True)
class Policy:
    """What a relying party accepts.

    - `allowed_measurements`: primary measurements accepted (None = any; per-model and per-user
      sets are applied separately by the KeyService at release time);
    - `allow_simulated`: accept the `sim` kind (off by default; production configs keep it off);
    - `allow_debug`: accept debug-mode TEEs (off by default);
    - `allowed_tcb_statuses` / `allowed_advisories`: TCB states and advisory ids accepted.
    """

    allowed_measurements: frozenset[str] | None = None
    allow_simulated: bool = False
    allow_debug: bool = False
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allowed_advisories: frozenset[str] = frozenset()
    extra: dict = field(default_factory=dict)


def validate(report: VerifiedReport, policy: Policy, expected_report_data: bytes | None = None) -> None:
    """Raise PolicyError unless `report` satisfies `policy` and binds `expected_report_data`."""
    if report.kind == "sim":
        if not policy.allow_simulated:
            raise PolicyError("kind", "simulated attestation is not allowed by this configuration", actual="sim")
        log.warning("accepting SIMULATED attestation evidence (allow_simulated is on)")
    if report.debug and not policy.allow_debug:
        raise PolicyError("debug", "debug-mode TEE refused", expected=False, actual=True)
    if report.kind != "sim" and report.tcb_status not in policy.allowed_tcb_statuses:
        raise PolicyError(
            "tcb_status", "TCB status not allowed", expected=sorted(policy.allowed_tcb_statuses), actual=report.tcb_status
        )
    unexpected = [a for a in report.advisories if a not in policy.allowed_advisories]
    if unexpected:
        raise PolicyError("advisories", "unaccepted advisories", expected=sorted(policy.allowed_advisories), actual=unexpected)
    if policy.allowed_measurements is not None and report.measurement not in policy.allowed_measurements:
        raise PolicyError(
            "measurement", "not in the allowed set", expected=sorted(policy.allowed_measurements), actual=report.measurement
        )
    if expected_report_data is not None:
        padded = expected_report_data.ljust(len(report.report_data), b"\0")
        if not hmac.compare_digest(padded, report.report_data):
            raise PolicyError(
                "report_data", "does not bind the expected value", expected=expected_report_data.hex(), actual=report.report_data.hex()
            )
