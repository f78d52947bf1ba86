"""Shared fixtures: the real attestation vectors (read in place, never copied) and emulators
of Gramine's and configfs-tsm's file protocols."""

from __future__ import annotations

import struct
from datetime import datetime
from pathlib import Path

import pytest

from veil.attest.evidence import Evidence
from veil.attest.providers import FileOps

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / ".." / "shared" / "attest-vectors"

SGX_TIME = datetime.fromisoformat("2025-06-19T11:56:00+00:00")
TDX_TIME = datetime.fromisoformat("2025-06-19T11:16:00+00:00")
SNP_TIME = datetime.fromisoformat("2025-06-19T12:00:00+00:00")


def load_vector(rel: str) -> bytes:
    """A vector's bytes, or skip the test with the reason when the folder is absent."""
    return _vector(rel)


def _vector(rel: str) -> bytes:
    path = VECTORS / rel
    if not path.exists():
        pytest.skip(
            f"attestation vectors not found at {VECTORS.resolve()} "
            "(expected ../shared/attest-vectors beside the checkout)"
        )
    return path.read_bytes()


@pytest.fixture(scope="session")
def sgx_quote() -> bytes:
    return _vector("sgx/sgx_quote")


@pytest.fixture(scope="session")
def sgx_collateral() -> bytes:
    return _vector("sgx/sgx_quote_collateral.json")


@pytest.fixture(scope="session")
def tdx_quote() -> bytes:
    return _vector("tdx/tdx_quote")


@pytest.fixture(scope="session")
def tdx_collateral() -> bytes:
    return _vector("tdx/tdx_quote_collateral.json")


@pytest.fixture(scope="session")
def snp_report() -> bytes:
    return _vector("snp/attestation.bin")


@pytest.fixture(scope="session")
def snp_vcek() -> bytes:
    return _vector("snp/vcek.der")


@pytest.fixture(scope="session")
def snp_ask_ark() -> bytes:
    return _vector("snp/ask_ark_milan.pem")


@pytest.fixture
def sgx_evidence(sgx_quote: bytes, sgx_collateral: bytes) -> Evidence:
    return Evidence(kind="sgx-dcap", raw=sgx_quote, report_data=b"", collateral=sgx_collateral)


@pytest.fixture
def tdx_evidence(tdx_quote: bytes, tdx_collateral: bytes) -> Evidence:
    return Evidence(kind="tdx", raw=tdx_quote, report_data=b"", collateral=tdx_collateral)


def with_report_data(quote: bytes, report_data: bytes) -> bytes:
    """A copy of a DCAP quote with its report data replaced (its signature no longer verifies)."""
    from veil.attest.dcap import parse_quote

    parsed = parse_quote(quote)
    start = parsed.regions["body"][0] + (320 if parsed.kind == "sgx-dcap" else 520)
    return quote[:start] + report_data.ljust(64, b"\0") + quote[start + 64 :]


class EmulatedConfigfs(FileOps):
    """configfs-tsm as the kernel implements it, on a temporary directory.

    `mkdir` of a report entry creates its attributes; writing `inblob` bumps `generation` and
    makes `outblob` the evidence `make_outblob(inblob)` returns; `rmdir` removes the entry
    (configfs removes attributes with it).
    """

    def __init__(self, provider: str, make_outblob, auxblob: bytes = b"") -> None:
        self.provider = provider
        self.make_outblob = make_outblob
        self.auxblob = auxblob
        self.entries_made = 0
        self.race = False

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        self.entries_made += 1
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "outblob").write_bytes(b"")
        (path / "auxblob").write_bytes(self.auxblob)

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "inblob":
            gen = int((path.parent / "generation").read_text()) + 1
            (path.parent / "generation").write_text(f"{gen}\n")
            (path.parent / "outblob").write_bytes(self.make_outblob(data))

    def read(self, path: Path) -> bytes:
        data = super().read(path)
        if self.race and path.name == "outblob":  # another process writes inblob meanwhile
            gen = int((path.parent / "generation").read_text()) + 1
            (path.parent / "generation").write_text(f"{gen}\n")
        return data

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)


def snp_with_report_data(report: bytes, report_data: bytes) -> bytes:
    return report[:0x50] + report_data.ljust(64, b"\0") + report[0x90:]


def cert_table(entries: list[tuple[str, bytes]]) -> bytes:
    """A GHCB certificate table (as the host hands it to the guest in auxblob)."""
    import uuid

    header_len = 24 * (len(entries) + 1)
    header, body = b"", b""
    for guid, der in entries:
        header += uuid.UUID(guid).bytes + struct.pack("<II", header_len + len(body), len(der))
        body += der
    return header + bytes(24) + body
