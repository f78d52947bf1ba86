"""Evidence providers: the code inside a TEE that produces evidence for given report data.

`select_provider` picks the one this machine supports and says which (log + `describe()`):

1. Gramine SGX, if `/dev/attestation/quote` exists (Gramine's pseudo-files, `gramine.py`);
2. Linux configfs-tsm, if `/sys/kernel/config/tsm/report` exists (TDX or SEV-SNP guests,
   `tsm.py`); the `provider` attribute of a report entry says which TEE;
3. the simulated TEE, only if a simulation root is given (development and tests);
4. otherwise `AttestationError`: no TEE found.

File access goes through `FileOps`, so tests can emulate the kernel's and Gramine's file
protocols in a temporary directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from veil.attest.errors import AttestationError
from veil.attest.evidence import Evidence

log = logging.getLogger("veil.attest")

GRAMINE_DIR = Path("dev/attestation")
TSM_REPORT_DIR = Path("sys/kernel/config/tsm/report")


class EvidenceProvider(Protocol):
    """Produces evidence whose report data is exactly the bytes given."""

    kind: str

    def get_evidence(self, report_data: bytes) -> Evidence: ...

    def describe(self) -> str: ...


class FileOps:
    """The file operations providers use; the default is the real filesystem.

    Pseudo-files (Gramine's /dev/attestation, configfs) compute their contents when read,
    so reads and writes are whole-file and unbuffered.
    """

    def read(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as f:
            written = f.write(data)
        if written != len(data):
            raise AttestationError(str(path), "short write", expected=len(data), actual=written)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)


def pad_report_data(report_data: bytes) -> bytes:
    """Report data is 64 bytes in every TEE; shorter values are zero-padded, longer refused."""
    if len(report_data) > 64:
        raise AttestationError("report_data", "at most 64 bytes", expected="<= 64", actual=len(report_data))
    return report_data.ljust(64, b"\0")


def select_provider(
    *,
    sim_root: Any = None,
    measurement: str | None = None,
    root: Path = Path("/"),
    fs: FileOps | None = None,
) -> EvidenceProvider:
    """The evidence provider for this machine (see the module docstring for the order)."""
    fs = fs or FileOps()
    provider: EvidenceProvider
    if fs.exists(root / GRAMINE_DIR / "quote"):
        from veil.attest.gramine import GramineProvider

        provider = GramineProvider(root=root, fs=fs)
    elif fs.exists(root / TSM_REPORT_DIR):
        from veil.attest.tsm import TsmProvider

        provider = TsmProvider(root=root, fs=fs)
    elif sim_root is not None:
        from veil.attest.measurement import measure
        from veil.attest.sim import SimProvider

        provider = SimProvider(sim_root, measurement or measure("runtime"))
    else:
        raise AttestationError(
            "tee",
            f"no TEE found: neither {root / GRAMINE_DIR / 'quote'} (Gramine SGX) nor "
            f"{root / TSM_REPORT_DIR} (configfs-tsm: TDX, SEV-SNP) exists, and simulation is not configured",
        )
    log.info("attestation provider: %s", provider.describe())
    return provider
