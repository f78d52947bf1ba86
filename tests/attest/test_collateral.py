"""Collateral parsing and sources: offline, and PCCS fetched and cached until nextUpdate."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from attest_helpers import SGX_TIME

from veil.attest.collateral import DcapCollateral, OfflineCollateral, PccsCollateral
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify


def test_collateral_validity_and_next_update(sgx_collateral: bytes) -> None:
    col = DcapCollateral.from_json(sgx_collateral)
    names = [v.name for v in col.validity]
    assert names == ["tcb_info", "qe_identity", "pck_crl", "root_ca_crl"]
    assert col.next_update.isoformat() == "2025-07-19T10:01:18+00:00"  # the QE identity's
    col.check_fresh(SGX_TIME)


@pytest.mark.parametrize("field", ["tcb_info", "pck_crl", "qe_identity_signature"])
def test_missing_or_bad_field_is_named(sgx_collateral: bytes, field: str) -> None:
    obj = json.loads(sgx_collateral)
    del obj[field]
    with pytest.raises(VerificationError) as info:
        DcapCollateral.from_json(json.dumps(obj))
    assert info.value.field == f"collateral.{field}"
    obj = json.loads(sgx_collateral)
    obj["pck_crl"] = "zz"
    with pytest.raises(VerificationError) as info:
        DcapCollateral.from_json(json.dumps(obj))
    assert info.value.field == "collateral.pck_crl"


def test_offline_source_per_kind(sgx_collateral: bytes) -> None:
    source = OfflineCollateral.for_kinds(sgx_collateral, "sgx-dcap")
    ev = Evidence(kind="sgx-dcap", raw=b"x", report_data=b"")
    assert source.get("sgx-dcap", ev, SGX_TIME) == sgx_collateral
    assert source.get("tdx", ev, SGX_TIME) is None


def test_pccs_source_fetches_once_and_caches_until_next_update(
    tmp_path: Path, sgx_quote: bytes, sgx_collateral: bytes
) -> None:
    calls: list[tuple[str, bytes]] = []

    def fetch(url: str, quote: bytes) -> bytes:
        calls.append((url, quote))
        return sgx_collateral

    source = PccsCollateral("https://pccs.example/", cache_dir=tmp_path, fetch=fetch)
    trust = TrustConfig(collateral=source)
    ev = Evidence(kind="sgx-dcap", raw=sgx_quote, report_data=b"")
    assert verify(ev, trust, SGX_TIME).tcb_status == "ConfigurationAndSWHardeningNeeded"
    verify(ev, trust, SGX_TIME + timedelta(days=1))
    assert len(calls) == 1 and calls[0][0] == "https://pccs.example"
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and "00A067110000" in cached[0].name and "processor" in cached[0].name

    # a new process reuses the disk cache
    fresh = PccsCollateral("https://pccs.example", cache_dir=tmp_path, fetch=fetch)
    assert fresh.get("sgx-dcap", ev, SGX_TIME) == sgx_collateral
    assert len(calls) == 1

    # past nextUpdate the source fetches again (and verification refuses the stale answer)
    later = SGX_TIME + timedelta(days=40)
    with pytest.raises(VerificationError, match="nextUpdate"):
        verify(ev, trust, later)
    assert len(calls) == 2
    assert source.get("sev-snp", ev, SGX_TIME) is None
