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

    `collateral`: an object with `get(kind, evidence, now) -> bytes | None`
    (`veil.attest.collateral.OfflineCollateral` or `PccsCollateral`). When it is None or has
    nothing for a kind, collateral sent inside `Evidence.collateral` is used: DCAP JSON for
    quotes, the certificate table (configfs-tsm auxblob) for SEV-SNP. Either is safe, as all of
    it is verified under the pinned roots.
    `options`: kind-specific anchors and inputs:
      - `intel_root_ca_sha256`: hex SHA-256 of the Intel SGX Root CA DER (default: Intel's);
      - `snp_ark_spki_sha256`: iterable of hex SHA-256 of pinned AMD ARK public keys
        (default: Milan, Genoa, Turin);
      - `snp_certs`: bytes or list of bytes (PEM bundle, DER, or certificate table) with the
        VCEK/VLEK, ASK/ASVK and ARK, e.g. fetched once from AMD KDS.
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
