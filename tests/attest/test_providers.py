"""Providers inside a TEE, tested by emulating Gramine's and configfs-tsm's file protocols."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from attest_helpers import SNP_TIME, EmulatedConfigfs, cert_table, snp_with_report_data, with_report_data
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.attest import snp
from veil.attest.errors import AttestationError
from veil.attest.gramine import GramineProvider
from veil.attest.providers import GRAMINE_DIR, TSM_REPORT_DIR, select_provider
from veil.attest.sim import SimProvider, SimRoot
from veil.attest.tsm import TsmProvider
from veil.attest.verify import TrustConfig, verify

WANT = b"veil-binding".ljust(32, b"\x07")


def gramine_root(tmp_path: Path, quote: bytes, attestation_type: str = "dcap") -> Path:
    d = tmp_path / GRAMINE_DIR
    d.mkdir(parents=True)
    (d / "attestation_type").write_text(attestation_type + "\n")
    (d / "user_report_data").write_bytes(bytes(64))
    (d / "quote").write_bytes(quote)
    return tmp_path


def test_gramine_provider_writes_report_data_and_returns_the_quote(tmp_path: Path, sgx_quote: bytes, caplog) -> None:
    root = gramine_root(tmp_path, with_report_data(sgx_quote, WANT))
    with caplog.at_level(logging.INFO, logger="veil.attest"):
        provider = select_provider(root=root)
    assert isinstance(provider, GramineProvider)
    assert "Gramine" in provider.describe() and "dcap" in provider.describe()
    assert any("attestation provider: sgx-dcap via Gramine" in r.getMessage() for r in caplog.records)
    evidence = provider.get_evidence(WANT)
    assert (root / GRAMINE_DIR / "user_report_data").read_bytes() == WANT.ljust(64, b"\0")
    assert evidence.kind == "sgx-dcap"
    assert evidence.report_data == WANT.ljust(64, b"\0")
    assert evidence.raw == (root / GRAMINE_DIR / "quote").read_bytes()


def test_gramine_provider_refuses_a_quote_for_other_report_data(tmp_path: Path, sgx_quote: bytes) -> None:
    provider = select_provider(root=gramine_root(tmp_path, sgx_quote))  # quote binds "Hello, world!"
    with pytest.raises(AttestationError) as info:
        provider.get_evidence(WANT)
    assert info.value.field == "quote.report_data"


def test_gramine_without_dcap_refused(tmp_path: Path, sgx_quote: bytes) -> None:
    with pytest.raises(AttestationError) as info:
        select_provider(root=gramine_root(tmp_path, sgx_quote, attestation_type="none"))
    assert info.value.field == "attestation_type"


def test_report_data_longer_than_64_bytes_refused(tmp_path: Path, sgx_quote: bytes) -> None:
    provider = select_provider(root=gramine_root(tmp_path, sgx_quote))
    with pytest.raises(AttestationError, match="report_data"):
        provider.get_evidence(b"x" * 65)


def tsm_root(tmp_path: Path) -> Path:
    (tmp_path / TSM_REPORT_DIR).mkdir(parents=True)
    return tmp_path


def test_tsm_tdx_provider(tmp_path: Path, tdx_quote: bytes, caplog) -> None:
    root = tsm_root(tmp_path)
    fs = EmulatedConfigfs("tdx_guest", lambda inblob: with_report_data(tdx_quote, inblob))
    with caplog.at_level(logging.INFO, logger="veil.attest"):
        provider = select_provider(root=root, fs=fs)
    assert isinstance(provider, TsmProvider) and provider.kind == "tdx"
    assert "configfs-tsm" in provider.describe() and "tdx_guest" in provider.describe()
    assert any("attestation provider: tdx via configfs-tsm" in r.getMessage() for r in caplog.records)
    evidence = provider.get_evidence(WANT)
    assert evidence.kind == "tdx" and evidence.report_data == WANT.ljust(64, b"\0")
    assert evidence.collateral is None
    assert list((root / TSM_REPORT_DIR).iterdir()) == []  # report entries are removed
    assert fs.entries_made == 2  # one probe, one report


def test_tsm_snp_provider_end_to_end_with_auxblob(
    tmp_path: Path, snp_report: bytes, snp_vcek: bytes, snp_ask_ark: bytes
) -> None:
    ask, ark = (c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(snp_ask_ark))
    table = cert_table([(str(snp.GUID_VCEK), snp_vcek), (str(snp.GUID_ASK), ask), (str(snp.GUID_ARK), ark)])
    fs = EmulatedConfigfs("sev_guest", lambda inblob: snp_with_report_data(snp_report, inblob), auxblob=table)
    provider = select_provider(root=tsm_root(tmp_path), fs=fs)
    assert provider.kind == "sev-snp"
    # the vector's report carries report data 01 02 03 04 05: asking for it yields the genuine report
    evidence = provider.get_evidence(bytes([1, 2, 3, 4, 5]))
    assert evidence.collateral == table
    report = verify(evidence, TrustConfig(), SNP_TIME)
    assert report.report_data == bytes([1, 2, 3, 4, 5]).ljust(64, b"\0")


def test_tsm_detects_concurrent_writer(tmp_path: Path, tdx_quote: bytes) -> None:
    fs = EmulatedConfigfs("tdx_guest", lambda inblob: with_report_data(tdx_quote, inblob))
    provider = select_provider(root=tsm_root(tmp_path), fs=fs)
    fs.race = True
    with pytest.raises(AttestationError) as info:
        provider.get_evidence(WANT)
    assert info.value.field == "tsm.generation"


def test_tsm_refuses_outblob_for_other_report_data(tmp_path: Path, tdx_quote: bytes) -> None:
    fs = EmulatedConfigfs("tdx_guest", lambda inblob: tdx_quote)
    provider = select_provider(root=tsm_root(tmp_path), fs=fs)
    with pytest.raises(AttestationError) as info:
        provider.get_evidence(WANT)
    assert info.value.field == "tsm.outblob.report_data"


def test_tsm_unknown_provider_refused(tmp_path: Path) -> None:
    with pytest.raises(AttestationError) as info:
        select_provider(root=tsm_root(tmp_path), fs=EmulatedConfigfs("arm_cca_guest", lambda b: b""))
    assert info.value.field == "tsm.provider" and info.value.actual == "arm_cca_guest"


def test_gramine_takes_precedence_over_tsm(tmp_path: Path, sgx_quote: bytes) -> None:
    root = gramine_root(tmp_path, sgx_quote)
    (root / TSM_REPORT_DIR).mkdir(parents=True)
    assert isinstance(select_provider(root=root), GramineProvider)


def test_sim_fallback_and_no_tee(tmp_path: Path) -> None:
    provider = select_provider(root=tmp_path, sim_root=SimRoot.generate(), measurement="ab" * 32)
    assert isinstance(provider, SimProvider) and provider.measurement == "ab" * 32
    assert provider.describe().startswith("sim")
    with pytest.raises(AttestationError) as info:
        select_provider(root=tmp_path)
    assert "no TEE found" in str(info.value)
