"""Debug-mode SGX/TDX quotes: genuine ones verify with `debug=True` and are refused by policy
naming `debug` (unless `allow_debug`); tampered ones report what is tampered, not debug.

dcap-qvl 0.7 refuses every debug enclave ("Debug mode is enabled", its last check, even with
`QuotePolicy.claims_only`; its Python API has no allow_debug), so before the fix a genuine debug
quote came out as a generic "not genuine" VerificationError and `Policy.allow_debug` never
applied. A genuinely verifying debug quote cannot come from Intel's PKI here, so the real vectors
are re-signed under a test root (dcap_pki) with the debug bit set: dcap-qvl then accepts
everything but the debug bit, exactly as it would a real debug enclave's quote.
"""

from __future__ import annotations

import json
from dataclasses import replace

import dcap_qvl
import pytest
from attest_helpers import SGX_TIME, TDX_TIME, load_vector
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from dcap_pki import make_pki

from veil.attest import dcap
from veil.attest.errors import PolicyError, VerificationError
from veil.attest.evidence import Evidence
from veil.attest.validate import Policy, validate
from veil.attest.verify import TrustConfig, verify

_KIND = {"sgx": "sgx-dcap", "tdx": "tdx"}


@pytest.fixture(scope="module", params=["sgx", "tdx"])
def pki(request):
    return request.param, make_pki(request.param)


def _trust(p) -> TrustConfig:
    return TrustConfig(options={"intel_root_ca_sha256": p.root_sha256})


def _debug_body(which: str, template: bytes) -> bytearray:
    body = bytearray(dcap.parse_quote(template).body)
    if which == "sgx":
        body[48] |= 0x02  # ATTRIBUTES.FLAGS bit 1: DEBUG
    else:
        body[120] |= 0x01  # TDATTRIBUTES bit 0: DEBUG
    return body


def _flip(data: bytes, pos: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def test_test_pki_is_sound(pki) -> None:
    """The re-signed production quote verifies like the real one (same TCB status)."""
    which, p = pki
    report = verify(p.evidence(_KIND[which]), _trust(p), p.now)
    assert report.debug is False
    assert report.tcb_status == ("ConfigurationAndSWHardeningNeeded" if which == "sgx" else "UpToDate")
    mr = slice(64, 96) if which == "sgx" else slice(136, 184)  # MRENCLAVE / MRTD
    assert report.measurement == dcap.parse_quote(p.template).body[mr].hex()


def test_dcap_qvl_refuses_genuine_debug_quotes_last(pki) -> None:
    """What dcap-qvl itself does (the reason for Veil's handling): it says debug, nothing else."""
    which, p = pki
    evidence = p.evidence(_KIND[which], bytes(_debug_body(which, p.template)))
    collateral = dcap_qvl.QuoteCollateralV3.from_json(evidence.collateral.decode())
    root = p.root.public_bytes(serialization.Encoding.DER)
    now = int(p.now.timestamp())
    with pytest.raises(ValueError, match="Debug mode is enabled"):
        dcap_qvl.verify_with_root_ca(evidence.raw, collateral, root, now)
    with pytest.raises(ValueError, match="Debug mode is enabled"):
        dcap_qvl.QuoteVerifier(root).verify_with_policy(
            evidence.raw, collateral, now, dcap_qvl.QuotePolicy.claims_only(now)
        )


def test_genuine_debug_quote_verifies_and_policy_refuses_naming_debug(pki) -> None:
    which, p = pki
    report = verify(p.evidence(_KIND[which], bytes(_debug_body(which, p.template))), _trust(p), p.now)
    assert report.debug is True
    assert report.tcb_status == dcap.TCB_NOT_EVALUATED and report.claims["tcb_evaluated"] is False
    with pytest.raises(PolicyError) as info:
        validate(report, Policy())
    assert info.value.field == "debug"
    assert ("ATTRIBUTES.DEBUG" if which == "sgx" else "TDATTRIBUTES.DEBUG") in info.value.reason
    assert (info.value.expected, info.value.actual) == (False, True)
    # allow_debug lifts the debug refusal; the unrated TCB must then be allowed explicitly
    with pytest.raises(PolicyError) as info:
        validate(report, Policy(allow_debug=True))
    assert info.value.field == "tcb_status" and "NotEvaluated" in info.value.reason
    validate(report, Policy(allow_debug=True, allowed_tcb_statuses=frozenset({"NotEvaluated"})))


def test_real_vector_with_debug_bit_reports_the_signature_failure() -> None:
    """Setting the bit in a real quote breaks its signature: that, not debug, is reported."""
    for raw, col, now, kind in (
        (load_vector("sgx/sgx_quote"), load_vector("sgx/sgx_quote_collateral.json"), SGX_TIME, "sgx-dcap"),
        (load_vector("tdx/tdx_quote"), load_vector("tdx/tdx_quote_collateral.json"), TDX_TIME, "tdx"),
    ):
        which = "sgx" if kind == "sgx-dcap" else "tdx"
        start, end = dcap.parse_quote(raw).regions["body"]
        tampered = raw[:start] + bytes(_debug_body(which, raw)) + raw[end:]
        assert tampered != raw
        with pytest.raises(VerificationError) as info:
            verify(Evidence(kind=kind, raw=tampered, report_data=b"", collateral=col), TrustConfig(), now)
        assert info.value.field == "quote.signature", str(info.value)


def test_debug_quote_with_bad_signature_reports_the_signature(pki) -> None:
    which, p = pki
    evidence = p.evidence(_KIND[which], bytes(_debug_body(which, p.template)))
    start = dcap.parse_quote(evidence.raw).regions["signature"][0]
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, raw=_flip(evidence.raw, start + 5)), _trust(p), p.now)
    assert info.value.field == "quote.signature"


def test_debug_td_without_sept_ve_disable_is_refused_naming_td_attributes() -> None:
    """dcap-qvl stops at DEBUG before checking SEPT_VE_DISABLE; Veil checks it itself."""
    p = make_pki("tdx")
    body = _debug_body("tdx", p.template)
    body[123] &= ~0x10  # TDATTRIBUTES bit 28: SEPT_VE_DISABLE
    with pytest.raises(VerificationError) as info:
        verify(p.evidence("tdx", bytes(body)), _trust(p), p.now)
    assert info.value.field == "quote.body.td_attributes" and "SEPT_VE_DISABLE" in info.value.reason
    body[120] &= ~0x01  # the same TD without debug: dcap-qvl's own refusal, now named
    with pytest.raises(VerificationError) as info:
        verify(p.evidence("tdx", bytes(body)), _trust(p), p.now)
    assert info.value.field == "quote.body.td_attributes" and "dcap-qvl" in info.value.reason


# --- Veil's own checks of a debug quote do not rely on dcap-qvl's check order --------------------


@pytest.fixture
def qvl_says_debug(monkeypatch):
    """dcap-qvl as if it checked the debug bit first (before any signature)."""

    def refuse(*args, **kwargs):
        raise ValueError("Verification failed: Debug mode is enabled")

    monkeypatch.setattr(dcap_qvl, "verify", refuse)
    monkeypatch.setattr(dcap_qvl, "verify_with_root_ca", refuse)


def _region_flip(raw: bytes, region: str, offset: int = 3) -> bytes:
    return _flip(raw, dcap.parse_quote(raw).regions[region][0] + offset)


@pytest.mark.parametrize(
    ("region", "field"),
    [
        ("signature", "quote.signature"),
        ("body", "quote.signature"),
        ("attestation_key", "quote."),  # not on the curve, or the signature fails under it
        ("qe_report_signature", "quote.qe_report.signature"),
        ("qe_auth_data", "quote.qe_report.report_data"),
    ],
)
def test_tampered_debug_quote_refused_even_if_dcap_qvl_only_said_debug(pki, qvl_says_debug, region, field) -> None:
    which, p = pki
    evidence = p.evidence(_KIND[which], bytes(_debug_body(which, p.template)))
    assert verify(evidence, _trust(p), p.now).debug is True  # as dcap-qvl really does it
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, raw=_region_flip(evidence.raw, region)), _trust(p), p.now)
    assert info.value.field.startswith(field), str(info.value)


def test_debug_quote_with_revoked_pck_refused(pki, qvl_says_debug) -> None:
    which, p = pki
    evidence = p.evidence(_KIND[which], bytes(_debug_body(which, p.template)))
    fields = json.loads(evidence.collateral)
    revoked = x509.RevokedCertificateBuilder().serial_number(p.pck_leaf.serial_number).revocation_date(p.now).build()
    crl = x509.load_der_x509_crl(bytes.fromhex(fields["pck_crl"]))
    builder = x509.CertificateRevocationListBuilder().issuer_name(crl.issuer)
    builder = builder.last_update(crl.last_update_utc).next_update(crl.next_update_utc).add_revoked_certificate(revoked)
    fields["pck_crl"] = builder.sign(p.pck_ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, collateral=json.dumps(fields).encode()), _trust(p), p.now)
    assert info.value.field == "quote.pck_chain[0]" and "revoked" in info.value.reason


def test_qvl_debug_refusal_without_debug_bit_is_not_taken_for_debug(pki, qvl_says_debug) -> None:
    which, p = pki
    with pytest.raises(VerificationError) as info:
        verify(p.evidence(_KIND[which]), _trust(p), p.now)
    assert info.value.field == ("quote.body.attributes" if which == "sgx" else "quote.body.td_attributes")


def test_real_vectors_classify_debug_from_their_attributes() -> None:
    for path, kind, off, bit in (("sgx/sgx_quote", "sgx-dcap", 48, 0x02), ("tdx/tdx_quote", "tdx", 120, 0x01)):
        quote = dcap.parse_quote(load_vector(path))
        body = bytearray(quote.body)
        claims = dcap._sgx_claims if kind == "sgx-dcap" else (lambda b, c: dcap._tdx_claims(b, 2, c))
        assert claims(bytes(body), {})[1] is False
        body[off] |= bit
        assert claims(bytes(body), {})[1] is True


def test_veils_own_debug_path_checks_accept_the_real_intel_signed_vectors() -> None:
    """The independent checks agree with Intel's real formats (signatures, QE identity masks, TD
    attributes), and reject a real quote changed in a part they check."""
    from veil.attest.collateral import DcapCollateral

    for quote_path, col_path in (
        ("sgx/sgx_quote", "sgx/sgx_quote_collateral.json"),
        ("tdx/tdx_quote", "tdx/tdx_quote_collateral.json"),
    ):
        quote = dcap.parse_quote(load_vector(quote_path))
        col = DcapCollateral.parse(load_vector(col_path))
        dcap._check_debug_quote(quote, col, quote.pck_chain())
        tampered = dcap.parse_quote(_region_flip(quote.raw, "qe_report", 130))  # QE MRSIGNER
        with pytest.raises(VerificationError) as info:
            dcap._check_debug_quote(tampered, col, tampered.pck_chain())
        assert info.value.field == "quote.qe_report.signature"


def test_debug_quote_of_another_quoting_enclave_refused(pki, qvl_says_debug) -> None:
    """A QE identity (validly signed) naming another QE signer than the quote's QE report."""
    from dcap_pki import _raw_sig

    which, p = pki
    evidence = p.evidence(_KIND[which], bytes(_debug_body(which, p.template)))
    fields = json.loads(evidence.collateral)
    identity = json.loads(fields["qe_identity"])
    identity["mrsigner"] = "ab" * 32
    fields["qe_identity"] = json.dumps(identity)
    fields["qe_identity_signature"] = _raw_sig(p.tcb_key, fields["qe_identity"].encode()).hex()
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, collateral=json.dumps(fields).encode()), _trust(p), p.now)
    assert info.value.field == "quote.qe_report.mrsigner", str(info.value)
