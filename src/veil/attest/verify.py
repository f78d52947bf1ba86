"""Verification dispatch: evidence + trust anchors + collateral + time → `VerifiedReport`.

Pure: no policy here (that is `validate`), no I/O except what a collateral source does.
Real kinds live in their own modules and are loaded on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence, VerifiedReport
from veil.attest.sim import verify_sim

# kind -> "module:function"; each function is fn(evidence, trust, now) -> VerifiedReport
_REAL_VERIFIERS = {
    "sgx-dcap": "veil.attest.dcap:verify_sgx",
    "tdx": "veil.attest.dcap:verify_tdx",
    "sev-snp": "veil.attest.snp:verify_snp",
}


@dataclass
class TrustConfig:
    """What a verifier trusts. `sim_roots`: simulation root public keys (empty = sim refused).

    `collateral`: an object with `get(kind, evidence, now) -> bytes` (offline file or PCCS).
    `options`: kind-specific anchors (e.g. pinned AMD ARK fingerprints).
    """

    sim_roots: list[bytes] = field(default_factory=list)
    collateral: Any = None
    options: dict[str, Any] = field(default_factory=dict)


def verify(evidence: Evidence, trust: TrustConfig, now: datetime | None = None) -> VerifiedReport:
    """Verify `evidence` is genuine at time `now` (default: the current UTC time)."""
    now = now or datetime.now(UTC)
    if evidence.kind == "sim":
        return verify_sim(evidence, trust.sim_roots)
    target = _REAL_VERIFIERS.get(evidence.kind)
    if target is None:
        raise VerificationError("kind", "unknown evidence kind", actual=evidence.kind)
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError):
        raise VerificationError("kind", f"{evidence.kind} verification is not available in this build") from None
    return func(evidence, trust, now)
