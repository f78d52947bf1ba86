"""SGX evidence inside Gramine: the `/dev/attestation` pseudo-files.

Gramine's protocol (manifest `sgx.remote_attestation = "dcap"`): write the 64-byte report data
to `/dev/attestation/user_report_data`, then read `/dev/attestation/quote`, which Gramine
produces by asking the quoting enclave for a DCAP quote over a fresh EREPORT carrying that
report data. `/dev/attestation/attestation_type` says `dcap` when this works.

The two steps are not atomic, so a lock serialises them within the process, and the quote's
report data is checked against what was written: a quote for somebody else's report data must
never leave this function.
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

from veil.attest.errors import AttestationError
from veil.attest.evidence import Evidence
from veil.attest.providers import GRAMINE_DIR, FileOps, pad_report_data

_LOCK = threading.Lock()


class GramineProvider:
    """Evidence provider for SGX enclaves run by Gramine (`sgx-dcap` quotes)."""

    kind = "sgx-dcap"

    def __init__(self, *, root: Path = Path("/"), fs: FileOps | None = None) -> None:
        self.dir = root / GRAMINE_DIR
        self.fs = fs or FileOps()
        type_file = self.dir / "attestation_type"
        self.attestation_type = (
            self.fs.read(type_file).decode(errors="replace").strip() if self.fs.exists(type_file) else "unknown"
        )
        if self.attestation_type not in ("dcap", "unknown"):
            raise AttestationError(
                "attestation_type",
                'Gramine is not configured for DCAP attestation (set sgx.remote_attestation = "dcap")',
                expected="dcap",
                actual=self.attestation_type,
            )

    def describe(self) -> str:
        return f"sgx-dcap via Gramine {self.dir} (attestation_type={self.attestation_type})"

    def get_evidence(self, report_data: bytes) -> Evidence:
        from veil.attest.dcap import parse_quote

        padded = pad_report_data(report_data)
        try:
            with _LOCK:
                self.fs.write(self.dir / "user_report_data", padded)
                raw = self.fs.read(self.dir / "quote")
        except OSError as exc:
            raise AttestationError("quote", f"Gramine did not produce a quote ({exc})") from None
        if not raw:
            raise AttestationError("quote", "Gramine returned an empty quote")
        quote = parse_quote(raw)
        if quote.kind != "sgx-dcap":
            raise AttestationError("quote.header.tee_type", "Gramine returned a non-SGX quote", actual=quote.kind)
        if not hmac.compare_digest(quote.report_data, padded):
            raise AttestationError(
                "quote.report_data",
                "quote does not carry the report data just written (concurrent writer?)",
                expected=padded.hex(),
                actual=quote.report_data.hex(),
            )
        return Evidence(kind=self.kind, raw=raw, report_data=padded)
