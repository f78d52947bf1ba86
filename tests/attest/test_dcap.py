"""SGX and TDX quote verification against the real vectors (dcap-qvl + Veil's strict checks)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from attest_helpers import SGX_TIME, TDX_TIME, load_vector
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attest import dcap
from veil.attest.collateral import OfflineCollateral
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify


def test_sgx_quote_verifies_with_status_and_advisories(sgx_evidence: Evidence) -> None:
    report = verify(sgx_evidence, TrustConfig(), SGX_TIME)
    assert report.kind == "sgx-dcap"
    assert report.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert report.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert report.measurement == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert report.measurement == report.claims["mrenclave"]
    assert report.claims["mrsigner"] == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert report.claims["isvprodid"] == 0 and report.claims["isvsvn"] == 0
    assert report.report_data.startswith(b"Hello, world!")
    assert report.debug is False


def test_tdx_quote_is_up_to_date(tdx_evidence: Evidence) -> None:
    report = verify(tdx_evidence, TrustConfig(), TDX_TIME)
    assert report.kind == "tdx"
    assert report.tcb_status == "UpToDate"
    assert report.advisories == ()
    assert report.measurement == report.claims["mrtd"]
    assert report.measurement.startswith("91eb2b44d141d4ec") and len(report.measurement) == 96
    assert report.claims["rtmr0"].startswith("44c0197b39157fdd")
    assert report.debug is False


def test_sgx_collateral_refused_as_expired_today(sgx_evidence: Evidence) -> None:
    with pytest.raises(VerificationError) as info:
        verify(sgx_evidence, TrustConfig(), datetime.now(UTC))
    err = info.value
    assert err.field.startswith("collateral.") and err.field.endswith(".nextUpdate")
    assert "root_ca_crl (nextUpdate 2026-04-03" in err.reason
    assert "tcb_info (nextUpdate 2025-07-19" in err.reason


def test_collateral_expiry_boundary(sgx_evidence: Evidence) -> None:
    # the QE identity is the first document to expire (2025-07-19T10:01:18Z)
    just_before = datetime.fromisoformat("2025-07-19T10:01:17+00:00")
    assert verify(sgx_evidence, TrustConfig(), just_before).tcb_status == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(VerificationError, match="qe_identity"):
        verify(sgx_evidence, TrustConfig(), just_before + timedelta(seconds=1))


def test_collateral_not_yet_issued_is_refused(sgx_evidence: Evidence) -> None:
    with pytest.raises(VerificationError) as info:
        verify(sgx_evidence, TrustConfig(), SGX_TIME - timedelta(days=1))
    assert info.value.field.endswith(".issueDate")


def test_missing_collateral_names_field(sgx_evidence: Evidence) -> None:
    with pytest.raises(VerificationError) as info:
        verify(replace(sgx_evidence, collateral=None), TrustConfig(), SGX_TIME)
    assert info.value.field == "collateral"


def test_configured_source_wins_over_evidence_collateral(
    sgx_evidence: Evidence, sgx_collateral: bytes, tdx_collateral: bytes
) -> None:
    wrong_in_evidence = replace(sgx_evidence, collateral=tdx_collateral)
    with pytest.raises(VerificationError) as info:
        verify(wrong_in_evidence, TrustConfig(), SGX_TIME)
    assert info.value.field.startswith("collateral.")
    trust = TrustConfig(collateral=OfflineCollateral.for_kinds(sgx_collateral, "sgx-dcap"))
    assert verify(wrong_in_evidence, trust, SGX_TIME).tcb_status == "ConfigurationAndSWHardeningNeeded"


def test_kind_mismatch_refused(sgx_quote: bytes, sgx_collateral: bytes) -> None:
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="tdx", raw=sgx_quote, report_data=b"", collateral=sgx_collateral), TrustConfig(), SGX_TIME)
    assert info.value.field == "quote.header.tee_type"


def test_pinned_root_mismatch_refused(sgx_evidence: Evidence) -> None:
    trust = TrustConfig(options={"intel_root_ca_sha256": "00" * 32})
    with pytest.raises(VerificationError) as info:
        verify(sgx_evidence, trust, SGX_TIME)
    assert info.value.field == "quote.pck_chain[2]"
    assert "pinned" in info.value.reason


def test_parse_quote_regions_and_errors(sgx_quote: bytes, tdx_quote: bytes) -> None:
    sgx = dcap.parse_quote(sgx_quote)
    assert sgx.version == 3 and sgx.kind == "sgx-dcap"
    assert sgx.regions["signed"] == (0, 432)
    tdx = dcap.parse_quote(tdx_quote)
    assert tdx.version == 4 and tdx.kind == "tdx"
    assert tdx.regions["trailing"][1] - tdx.regions["trailing"][0] == 70  # padding after the signature data
    assert dcap.detect_kind(sgx_quote) == "sgx-dcap" and dcap.detect_kind(tdx_quote) == "tdx"
    with pytest.raises(VerificationError, match="quote.header.version"):
        dcap.parse_quote(b"\x07\x00" + sgx_quote[2:])
    with pytest.raises(VerificationError) as info:
        dcap.parse_quote(sgx_quote[:1000])
    assert info.value.field.startswith("quote.")


def test_debug_flags_come_from_attributes(sgx_quote: bytes, tdx_quote: bytes) -> None:
    body = bytearray(dcap.parse_quote(sgx_quote).body)
    assert dcap._sgx_claims(bytes(body), {})[1] is False
    body[48] |= 0x02  # ATTRIBUTES.DEBUG
    assert dcap._sgx_claims(bytes(body), {})[1] is True
    td = bytearray(dcap.parse_quote(tdx_quote).body)
    assert dcap._tdx_claims(bytes(td), 2, {})[1] is False
    td[120] |= 0x01  # TDATTRIBUTES.DEBUG
    assert dcap._tdx_claims(bytes(td), 2, {})[1] is True


# Which error fields a flip in each part of a quote may produce: the failure must be named.
_EXPECTED_FIELDS = {
    "signed": ("quote.signature", "quote.header.", "quote.body_type"),
    "signature": ("quote.signature",),
    "attestation_key": ("quote.qe_report.report_data", "quote.signature"),
    "qe_report": ("quote.qe_report.signature", "quote.qe_report"),
    "qe_report_signature": ("quote.qe_report.signature",),
    "qe_auth_data": ("quote.qe_report.report_data",),
    "pck_chain": ("quote.pck_chain",),
}


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def _evidence(which: str) -> tuple[Evidence, datetime]:
    # loaded here, not through fixtures, so hypothesis reports stay short
    if which == "sgx":
        raw, col, now = load_vector("sgx/sgx_quote"), load_vector("sgx/sgx_quote_collateral.json"), SGX_TIME
    else:
        raw, col, now = load_vector("tdx/tdx_quote"), load_vector("tdx/tdx_quote_collateral.json"), TDX_TIME
    return Evidence(kind="sgx-dcap" if which == "sgx" else "tdx", raw=raw, report_data=b"", collateral=col), now


@pytest.mark.parametrize("which", ["sgx", "tdx"])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_in_signed_parts_fails_naming_the_part(which: str, data: st.DataObject) -> None:
    evidence, now = _evidence(which)
    regions = dcap.parse_quote(evidence.raw).regions
    region = data.draw(st.sampled_from(sorted(_EXPECTED_FIELDS)), label="region")
    start, end = regions[region]
    pos = data.draw(st.integers(start, end - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, raw=_flip(evidence.raw, pos, bit)), TrustConfig(), now)
    assert info.value.field.startswith(_EXPECTED_FIELDS[region]), (region, pos, bit, str(info.value))


_COLLATERAL_FIELDS = [
    "tcb_info",
    "tcb_info_signature",
    "qe_identity",
    "qe_identity_signature",
    "pck_crl",
    "root_ca_crl",
    "tcb_info_issuer_chain",
    "qe_identity_issuer_chain",
    "pck_crl_issuer_chain",
]


def test_a_crl_with_a_flipped_version_fails_naming_it() -> None:
    """Found by the property below: cryptography raises InvalidVersion, not ValueError."""
    sgx_evidence, _ = _evidence("sgx")
    fields = json.loads(sgx_evidence.collateral)
    fields["pck_crl"] = _flip(bytes.fromhex(fields["pck_crl"]), 9, 0).hex()
    tampered = replace(sgx_evidence, collateral=json.dumps(fields).encode())
    with pytest.raises(VerificationError) as info:
        verify(tampered, TrustConfig(), SGX_TIME)
    assert info.value.field.startswith("collateral"), str(info.value)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_in_collateral_fails_naming_it(data: st.DataObject) -> None:
    sgx_evidence, _ = _evidence("sgx")
    fields = json.loads(sgx_evidence.collateral)
    name = data.draw(st.sampled_from(_COLLATERAL_FIELDS), label="field")
    value = fields[name]
    if name in ("tcb_info_signature", "qe_identity_signature", "pck_crl", "root_ca_crl"):
        raw = bytes.fromhex(value)
        fields[name] = _flip(raw, data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 7))).hex()
    else:
        raw = value.encode()
        flipped = _flip(raw, data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 6)))
        fields[name] = flipped.decode()
    tampered = replace(sgx_evidence, collateral=json.dumps(fields).encode())
    with pytest.raises(VerificationError) as info:
        verify(tampered, TrustConfig(), SGX_TIME)
    assert info.value.field.startswith("collateral"), (name, str(info.value))
