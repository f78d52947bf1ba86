"""TDX and SEV-SNP evidence through Linux configfs-tsm (`/sys/kernel/config/tsm/report`).

The kernel's protocol (Documentation/ABI/testing/configfs-tsm): `mkdir` a report entry, write
64 bytes of report data to its `inblob`, read `outblob` (a TDX quote, or an SEV-SNP report) and
`auxblob` (SEV-SNP: the host's certificate table with VCEK, ASK and ARK), then `rmdir`. The
`provider` attribute names the TEE (`tdx_guest`, `sev_guest`). `generation` counts writes to the
entry; it must not change between writing `inblob` and reading the blobs, otherwise another
writer raced us and the blobs may be for its report data.
"""

from __future__ import annotations

import hmac
import os
import threading
import uuid
from pathlib import Path

from veil.attest.errors import AttestationError
from veil.attest.evidence import Evidence
from veil.attest.providers import TSM_REPORT_DIR, FileOps, pad_report_data

#: configfs-tsm provider name -> Veil evidence kind
PROVIDER_KINDS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


class TsmProvider:
    """Evidence provider for TDX and SEV-SNP guests (kernel 6.7+ configfs-tsm)."""

    def __init__(self, *, root: Path = Path("/"), fs: FileOps | None = None, privlevel: int | None = None) -> None:
        self.dir = root / TSM_REPORT_DIR
        self.fs = fs or FileOps()
        self.privlevel = privlevel
        self._lock = threading.Lock()
        # probe once: the provider is a property of the machine
        try:
            entry = self._make_entry()
            try:
                self.provider = self._read_text(entry / "provider")
            finally:
                self.fs.rmdir(entry)
        except OSError as exc:
            raise AttestationError(
                "tsm.provider",
                f"cannot create a report entry under {self.dir} ({exc}); is configfs mounted and are we root?",
            ) from None
        kind = PROVIDER_KINDS.get(self.provider)
        if kind is None:
            raise AttestationError(
                "tsm.provider",
                "unsupported configfs-tsm provider",
                expected=sorted(PROVIDER_KINDS),
                actual=self.provider,
            )
        self.kind = kind

    def describe(self) -> str:
        return f"{self.kind} via configfs-tsm {self.dir} (provider={self.provider})"

    def _make_entry(self) -> Path:
        entry = self.dir / f"veil-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(entry)
        return entry

    def _read_text(self, path: Path) -> str:
        return self.fs.read(path).decode(errors="replace").strip()

    def get_evidence(self, report_data: bytes) -> Evidence:
        padded = pad_report_data(report_data)
        try:
            outblob, auxblob, generation, after = self._exchange(padded)
        except OSError as exc:
            raise AttestationError("tsm", f"configfs-tsm report failed ({exc})") from None
        if generation != after:
            raise AttestationError(
                "tsm.generation", "report entry was written concurrently", expected=generation, actual=after
            )
        if not outblob:
            raise AttestationError("tsm.outblob", "kernel returned no evidence")
        actual = self._report_data_of(outblob)
        if not hmac.compare_digest(actual, padded):
            raise AttestationError(
                "tsm.outblob.report_data",
                "evidence does not carry the report data written",
                expected=padded.hex(),
                actual=actual.hex(),
            )
        return Evidence(kind=self.kind, raw=outblob, report_data=padded, collateral=auxblob or None)

    def _exchange(self, padded: bytes) -> tuple[bytes, bytes, str, str]:
        """One report entry's life: write inblob, read the blobs and generation, remove it."""
        with self._lock:
            entry = self._make_entry()
            try:
                if self.privlevel is not None:
                    self.fs.write(entry / "privlevel", str(self.privlevel).encode())
                self.fs.write(entry / "inblob", padded)
                generation = self._read_text(entry / "generation")
                outblob = self.fs.read(entry / "outblob")
                auxblob = self.fs.read(entry / "auxblob") if self.fs.exists(entry / "auxblob") else b""
                after = self._read_text(entry / "generation")
            finally:
                self.fs.rmdir(entry)
        return outblob, auxblob, generation, after

    def _report_data_of(self, outblob: bytes) -> bytes:
        if self.kind == "sev-snp":
            from veil.attest.snp import parse_report

            return parse_report(outblob).report_data
        from veil.attest.dcap import parse_quote

        quote = parse_quote(outblob)
        if quote.kind != "tdx":
            raise AttestationError("tsm.outblob", "tdx_guest returned a non-TDX quote", actual=quote.kind)
        return quote.report_data
