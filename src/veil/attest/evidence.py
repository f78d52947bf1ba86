"""The `Evidence` wire type and the `VerifiedReport` a verifier returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from veil.crypto.encoding import b64d, b64e
from veil.crypto.errors import MalformedError

VERSION = 1
KINDS = ("sim", "sgx-dcap", "tdx", "sev-snp")
MAX_RAW_BYTES = 64 * 1024


@dataclass(frozen=True)
class Evidence:
    """Evidence as produced in a TEE: its kind, the raw quote/report, and the report data it claims.

    `report_data` is a convenience copy; verifiers take the authoritative value from `raw`.
    `collateral` optionally carries verification collateral (e.g. DCAP JSON) supplied with it.
    """

    kind: str
    raw: bytes
    report_data: bytes
    collateral: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "kind": self.kind,
            "raw": b64e(self.raw),
            "report_data": b64e(self.report_data),
        }
        if self.collateral is not None:
            out["collateral"] = b64e(self.collateral)
        return out

    @classmethod
    def from_json(cls, obj: object) -> Evidence:
        if not isinstance(obj, dict):
            raise MalformedError("evidence", "must be a JSON object")
        if obj.get("v") != VERSION:
            raise MalformedError("evidence.v", f"unsupported version {obj.get('v')!r}")
        kind = obj.get("kind")
        if kind not in KINDS:
            raise MalformedError("evidence.kind", f"must be one of {list(KINDS)}")
        raw = b64d(obj.get("raw"), "evidence.raw")
        if not raw or len(raw) > MAX_RAW_BYTES:
            raise MalformedError("evidence.raw", f"must be 1..{MAX_RAW_BYTES} bytes")
        collateral = obj.get("collateral")
        return cls(
            kind=kind,
            raw=raw,
            report_data=b64d(obj.get("report_data"), "evidence.report_data"),
            collateral=None if collateral is None else b64d(collateral, "evidence.collateral"),
        )


@dataclass(frozen=True)
class VerifiedReport:
    """What a verifier established about genuine evidence; policy is applied to this.

    `measurement` is the kind's primary code identity as lowercase hex (MRENCLAVE, MRTD,
    MEASUREMENT, or the simulated measurement), the value Veil's allow-lists hold.
    `claims` carries kind-specific fields (MRSIGNER, ISVSVN, RTMRs, guest policy, ...).
    """

    kind: str
    measurement: str
    report_data: bytes
    debug: bool
    tcb_status: str = "UpToDate"
    advisories: tuple[str, ...] = ()
    claims: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-safe description, for audit logs and `veil attest verify --json`."""
        return {
            "kind": self.kind,
            "measurement": self.measurement,
            "report_data": self.report_data.hex(),
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "claims": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.claims.items()},
        }
