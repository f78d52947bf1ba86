"""SEV-SNP report verification: the real Milan vector, and a test PKI for the negative paths."""

from __future__ import annotations

import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from attest_helpers import SNP_TIME, cert_table, load_vector
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.attest import snp
from veil.attest.errors import PolicyError, VerificationError
from veil.attest.evidence import Evidence
from veil.attest.validate import Policy, validate
from veil.attest.verify import TrustConfig, verify


def _milan() -> tuple[bytes, bytes, bytes]:
    return load_vector("snp/attestation.bin"), load_vector("snp/vcek.der"), load_vector("snp/ask_ark_milan.pem")


def _trust(vcek: bytes, chain: bytes) -> TrustConfig:
    return TrustConfig(options={"snp_certs": [vcek, chain]})


def test_snp_report_verifies_under_vcek_and_milan_chain() -> None:
    raw, vcek, chain = _milan()
    report = verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _trust(vcek, chain), SNP_TIME)
    assert report.kind == "sev-snp"
    assert report.measurement.startswith("b07af9620f3b839b") and len(report.measurement) == 96
    assert report.report_data[:5] == bytes([1, 2, 3, 4, 5])
    assert report.debug is True  # guest policy 0xb0000 has DEBUG (bit 19)
    assert report.claims["product"] == "Milan"
    assert report.claims["signing_key"] == "vcek"
    assert report.claims["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert report.claims["policy_flags"]["debug"] is True
    assert report.claims["ark_spki_sha256"] == snp.AMD_ARK_SPKI_SHA256["Milan"]


def test_snp_certs_from_auxblob_certificate_table() -> None:
    raw, vcek, chain = _milan()
    ask, ark = (c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(chain))
    table = cert_table([(str(snp.GUID_VCEK), vcek), (str(snp.GUID_ASK), ask), (str(snp.GUID_ARK), ark)])
    report = verify(Evidence(kind="sev-snp", raw=raw, report_data=b"", collateral=table), TrustConfig(), SNP_TIME)
    assert report.claims["chip_id"].startswith("3ac3fe21")


def test_production_policy_refuses_debug_snp_report() -> None:
    raw, vcek, chain = _milan()
    report = verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _trust(vcek, chain), SNP_TIME)
    with pytest.raises(PolicyError) as info:
        validate(report, Policy(allowed_measurements=frozenset({report.measurement})))
    assert info.value.field == "debug"
    assert "bit 19" in info.value.reason
    assert info.value.expected is False and info.value.actual is True
    validate(report, Policy(allow_debug=True, allowed_measurements=frozenset({report.measurement})))


def test_unpinned_ark_refused() -> None:
    raw, vcek, chain = _milan()
    trust = TrustConfig(options={"snp_certs": [vcek, chain], "snp_ark_spki_sha256": ["ab" * 32]})
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), trust, SNP_TIME)
    assert info.value.field == "snp.ark"
    assert info.value.actual == [snp.AMD_ARK_SPKI_SHA256["Milan"]]


def test_missing_certs_and_expired_vcek() -> None:
    raw, vcek, chain = _milan()
    ev = Evidence(kind="sev-snp", raw=raw, report_data=b"")
    with pytest.raises(VerificationError) as info:
        verify(ev, TrustConfig(options={"snp_certs": [vcek]}), SNP_TIME)
    assert info.value.field == "snp.ark"
    with pytest.raises(VerificationError) as info:
        verify(ev, TrustConfig(options={"snp_certs": [chain]}), SNP_TIME)
    assert info.value.field == "snp.vcek"
    with pytest.raises(VerificationError) as info:
        verify(ev, _trust(vcek, chain), datetime(2030, 1, 1, tzinfo=UTC))
    assert info.value.field == "snp.vcek.validity"


def test_report_parse_errors() -> None:
    raw, _, _ = _milan()
    with pytest.raises(VerificationError, match="report"):
        snp.parse_report(raw[:-1])
    with pytest.raises(VerificationError) as info:
        snp.parse_report(struct.pack("<I", 9) + raw[4:])
    assert info.value.field == "report.version"
    with pytest.raises(VerificationError) as info:
        snp.parse_report(raw[:0x34] + struct.pack("<I", 2) + raw[0x38:])
    assert info.value.field == "report.signature_algo"


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


@settings(max_examples=150, deadline=None)
@given(region=st.sampled_from(["signed", "signature"]), data=st.data())
def test_flipped_bit_in_report_fails_signature(region: str, data: st.DataObject) -> None:
    raw, vcek, chain = _milan()
    start, end = (0, snp.SIGNED_LEN) if region == "signed" else (snp.SIGNED_LEN, snp.SIGNED_LEN + 144)
    pos, bit = data.draw(st.integers(start, end - 1)), data.draw(st.integers(0, 7))
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=_flip(raw, pos, bit), report_data=b""), _trust(vcek, chain), SNP_TIME)
    assert info.value.field.startswith("report."), str(info.value)


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from([0, 1, 2]), data=st.data())
def test_flipped_bit_in_any_certificate_fails_naming_it(which: int, data: st.DataObject) -> None:
    raw, vcek, chain = _milan()
    ders = [vcek] + [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(chain)]
    ders[which] = _flip(ders[which], data.draw(st.integers(0, len(ders[which]) - 1)), data.draw(st.integers(0, 7)))
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), TrustConfig(options={"snp_certs": ders}), SNP_TIME)
    assert info.value.field.startswith("snp."), str(info.value)


# --- a test PKI shaped like AMD's, to reach the checks the real vector cannot --------------------

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, public_key, signer, extensions=()) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - timedelta(days=1))
        .not_valid_after(_NOW + timedelta(days=365))
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)


@pytest.fixture(scope="module")
def test_pki():
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    chip = bytes(range(64))
    ark = _cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
    ask = _cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
    tcb_ext = [
        ("1.3.6.1.4.1.3704.1.2", b"\x16\x08Milan-B0"),
        ("1.3.6.1.4.1.3704.1.3.1", b"\x02\x01\x03"),
        ("1.3.6.1.4.1.3704.1.3.2", b"\x02\x01\x00"),
        ("1.3.6.1.4.1.3704.1.3.3", b"\x02\x01\x08"),
        ("1.3.6.1.4.1.3704.1.3.8", b"\x02\x01\x73"),
        ("1.3.6.1.4.1.3704.1.4", chip),
    ]
    vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, tcb_ext)
    return {"ark": ark, "ask": ask, "vcek": vcek, "vcek_key": vcek_key, "chip": chip}


def _tcb(bl: int, tee: int, snp_: int, ucode: int) -> int:
    return int.from_bytes(bytes([bl, tee, 0, 0, 0, 0, snp_, ucode]), "little")


def _report(
    key: ec.EllipticCurvePrivateKey, *, chip: bytes, tcb: int, policy: int = 0x30000, measurement: bytes = b"\x11" * 48
) -> bytes:
    r = bytearray(snp.REPORT_LEN)
    struct.pack_into("<IIQ", r, 0, 2, 0, policy)
    struct.pack_into("<IIQQI", r, 0x30, 0, 1, tcb, 0, 0)
    r[0x50:0x90] = b"\x22" * 64
    r[0x90:0xC0] = measurement
    struct.pack_into("<Q", r, 0x180, tcb)
    r[0x1A0:0x1E0] = chip
    sig = key.sign(bytes(r[: snp.SIGNED_LEN]), ec.ECDSA(hashes.SHA384()))
    rr, ss = utils.decode_dss_signature(sig)
    r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
    r[0x2E8:0x330] = ss.to_bytes(72, "little")
    return bytes(r)


def _pki_trust(pki) -> TrustConfig:
    pem = b"".join(pki[n].public_bytes(serialization.Encoding.PEM) for n in ("vcek", "ask", "ark"))
    return TrustConfig(options={"snp_certs": pem, "snp_ark_spki_sha256": [snp.spki_sha256(pki["ark"])]})


def test_test_pki_report_verifies(test_pki) -> None:
    raw = _report(test_pki["vcek_key"], chip=test_pki["chip"], tcb=_tcb(3, 0, 8, 0x73))
    report = verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _pki_trust(test_pki), _NOW)
    assert report.debug is False
    assert report.claims["reported_tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 0x73}
    validate(report, Policy(snp_min_tcb={"snp": 8, "microcode": 0x73}))
    with pytest.raises(PolicyError) as info:
        validate(report, Policy(snp_min_tcb={"snp": 9}))
    assert info.value.field == "reported_tcb.snp" and info.value.actual == 8


def test_vcek_of_another_tcb_refused(test_pki) -> None:
    raw = _report(test_pki["vcek_key"], chip=test_pki["chip"], tcb=_tcb(3, 0, 7, 0x73))
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _pki_trust(test_pki), _NOW)
    assert info.value.field == "snp.vcek.tcb.snp"
    assert (info.value.expected, info.value.actual) == (8, 7)


def test_vcek_of_another_chip_refused(test_pki) -> None:
    raw = _report(test_pki["vcek_key"], chip=b"\x99" * 64, tcb=_tcb(3, 0, 8, 0x73))
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _pki_trust(test_pki), _NOW)
    assert info.value.field == "report.chip_id"


def test_report_signed_by_other_key_refused(test_pki) -> None:
    raw = _report(ec.generate_private_key(ec.SECP384R1()), chip=test_pki["chip"], tcb=_tcb(3, 0, 8, 0x73))
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), _pki_trust(test_pki), _NOW)
    assert info.value.field == "report.signature"


def test_ask_not_signed_by_pinned_ark_refused(test_pki) -> None:
    other_ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake_ask = _cert("SEV-Milan", "ARK-Milan", test_pki["ask"].public_key(), other_ark_key)
    raw = _report(test_pki["vcek_key"], chip=test_pki["chip"], tcb=_tcb(3, 0, 8, 0x73))
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (test_pki["vcek"], fake_ask, test_pki["ark"]))
    trust = TrustConfig(options={"snp_certs": pem, "snp_ark_spki_sha256": [snp.spki_sha256(test_pki["ark"])]})
    with pytest.raises(VerificationError) as info:
        verify(replace(Evidence(kind="sev-snp", raw=raw, report_data=b"")), trust, _NOW)
    assert info.value.field == "snp.ask.signature"
