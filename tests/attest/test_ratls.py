"""RA-TLS certificates: evidence extraction from both Gramine formats and key binding."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from attest_helpers import SGX_TIME, with_report_data
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.attest import ratls
from veil.attest.collateral import OfflineCollateral
from veil.attest.errors import VerificationError
from veil.attest.verify import TrustConfig


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def bstr(b: bytes) -> bytes:
    return _cbor_head(2, len(b)) + b


def tstr(s: str) -> bytes:
    return _cbor_head(3, len(s)) + s.encode()


def tagged_evidence(quote: bytes, claims: bytes, tag: int = 60000) -> bytes:
    return _cbor_head(6, tag) + _cbor_head(4, 2) + bstr(quote) + bstr(claims)


def claims_for(spki: bytes, alg: int = 1) -> bytes:
    hash_entry = _cbor_head(4, 2) + _cbor_head(0, alg) + bstr(hashlib.sha256(spki).digest())
    return _cbor_head(5, 1) + tstr("pubkey-hash") + bstr(hash_entry)


def make_cert(key: ec.EllipticCurvePrivateKey, extensions: list[tuple[str, bytes]]) -> bytes:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "RATLS")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def spki_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_both_formats_bound_to_the_key_are_extracted(key, sgx_quote: bytes) -> None:
    spki = spki_of(key)
    claims = claims_for(spki)
    tagged_quote = with_report_data(sgx_quote, hashlib.sha256(claims).digest())
    legacy_quote = with_report_data(sgx_quote, hashlib.sha256(spki).digest())
    cert = make_cert(
        key, [("2.23.133.5.4.9", tagged_evidence(tagged_quote, claims)), ("1.2.840.113741.1337.6", legacy_quote)]
    )
    found = ratls.extract_evidence(cert)
    assert found.formats == ("tcg-dice-tagged-evidence", "gramine-legacy")
    assert found.public_key_spki == spki
    assert found.evidence.kind == "sgx-dcap"
    assert found.evidence.raw == tagged_quote


def test_bound_certificate_with_a_forged_quote_fails_quote_verification(
    key, sgx_quote: bytes, sgx_collateral: bytes
) -> None:
    spki = spki_of(key)
    cert = make_cert(key, [("1.2.840.113741.1337.6", with_report_data(sgx_quote, hashlib.sha256(spki).digest()))])
    trust = TrustConfig(collateral=OfflineCollateral.for_kinds(sgx_collateral))
    with pytest.raises(VerificationError) as info:
        ratls.verify_certificate(cert, trust, SGX_TIME)
    assert info.value.field == "quote.signature"  # report data was changed after signing


def test_quote_not_binding_the_key_is_refused(key, sgx_quote: bytes) -> None:
    cert = make_cert(key, [("1.2.840.113741.1337.6", sgx_quote)])
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(cert)
    assert info.value.field == "ratls.legacy_quote.report_data"
    assert info.value.actual.startswith(b"Hello, world!".hex())


def test_tagged_claims_for_another_key_refused(key, sgx_quote: bytes) -> None:
    other = spki_of(ec.generate_private_key(ec.SECP384R1()))
    claims = claims_for(other)
    cert = make_cert(
        key, [("2.23.133.5.4.9", tagged_evidence(with_report_data(sgx_quote, hashlib.sha256(claims).digest()), claims))]
    )
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(cert)
    assert info.value.field == "ratls.tagged_evidence.claims.pubkey-hash"


def test_tagged_quote_not_binding_claims_refused(key, sgx_quote: bytes) -> None:
    claims = claims_for(spki_of(key))
    cert = make_cert(key, [("2.23.133.5.4.9", tagged_evidence(sgx_quote, claims))])
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(cert)
    assert info.value.field == "ratls.tagged_evidence.report_data"


def test_malformed_tagged_evidence_and_missing_extension(key, sgx_quote: bytes) -> None:
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(make_cert(key, [("2.23.133.5.4.9", tagged_evidence(sgx_quote, b"", tag=12345))]))
    assert info.value.field == "ratls.tagged_evidence.tag"
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(make_cert(key, [("2.23.133.5.4.9", b"\xff\x00")]))
    assert info.value.field == "ratls.tagged_evidence"
    with pytest.raises(VerificationError) as info:
        ratls.extract_evidence(make_cert(key, []))
    assert info.value.field == "ratls.certificate"


def test_cbor_decoder_round_trips_what_gramine_emits() -> None:
    item = ratls.cbor_decode(tagged_evidence(b"q" * 300, b"c"))
    assert item == ("tag", 60000, [b"q" * 300, b"c"])
    with pytest.raises(ValueError):
        ratls.cbor_decode(bstr(b"abc") + b"\x00")
