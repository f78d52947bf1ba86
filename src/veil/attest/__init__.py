"""Attestation, split as go-sev-guest splits it.

- providers: inside the TEE, produce `Evidence` for given report data;
- verify: signatures, certificate chains, collateral, TCB status. Pure functions of evidence,
  trust anchors, collateral and time, returning a `VerifiedReport`;
- validate: policy (measurement allow-lists, debug, TCB, report-data binding) over that report.

Depends on nothing else in Veil but `veil.crypto`'s encodings.
"""

from veil.attest.errors import AttestationError, PolicyError, VerificationError
from veil.attest.evidence import Evidence, VerifiedReport

__all__ = ["AttestationError", "Evidence", "PolicyError", "VerificationError", "VerifiedReport"]
