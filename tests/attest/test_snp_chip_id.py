"""The VCEK hardware id against the report's CHIP_ID: 64 bytes on Milan/Genoa, 8 on Turin.

On Turin the VCEK's hwid extension (1.3.6.1.4.1.3704.1.4) is 8 bytes, the first 8 bytes of the
report's 64-byte CHIP_ID, whose other 56 bytes AMD specifies as zero. Before the fix every
genuine Turin report was refused as `report.chip_id`. No real Turin report is available, so the
Turin case is a realistic constructed one (and a test PKI shaped like AMD's Turin chain); the
Milan case is the real vector.
"""

from __future__ import annotations

import struct
import warnings
from datetime import UTC, datetime, timedelta

import pytest
from attest_helpers import SNP_TIME, load_vector
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from veil.attest import snp
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify

TURIN_HWID = bytes.fromhex("7c3a91e05bd2486f")  # a Turin-form hwid: 8 bytes
TURIN_CHIP_ID = TURIN_HWID + bytes(56)  # as a Turin report carries it


def _milan_hwid_and_chip_id() -> tuple[bytes, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD's VCEK serial number; the certificate is AMD's
        vcek = x509.load_der_x509_certificate(load_vector("snp/vcek.der"))
    hwid = vcek.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")).value.value
    return hwid, snp.parse_report(load_vector("snp/attestation.bin")).chip_id


def test_milan_64_byte_hwid_equals_chip_id() -> None:
    hwid, chip_id = _milan_hwid_and_chip_id()
    assert len(hwid) == 64
    snp.check_chip_id(hwid, chip_id, "Milan")
    snp.check_chip_id(b"\x04\x40" + hwid, chip_id, "Milan")  # the same id as a DER OCTET STRING
    flipped = bytes([chip_id[0] ^ 1]) + chip_id[1:]
    with pytest.raises(VerificationError) as info:
        snp.check_chip_id(hwid, flipped, "Milan")
    assert info.value.field == "report.chip_id"
    with pytest.raises(VerificationError) as info:
        snp.check_chip_id(hwid[:8], chip_id, "Milan")  # an 8-byte hwid is Turin's only
    assert info.value.field == "snp.vcek.hwid"


def test_turin_8_byte_hwid_is_the_chip_id_prefix() -> None:
    snp.check_chip_id(TURIN_HWID, TURIN_CHIP_ID, "Turin")
    snp.check_chip_id(b"\x04\x08" + TURIN_HWID, TURIN_CHIP_ID, "Turin")  # DER OCTET STRING form
    snp.check_chip_id(TURIN_CHIP_ID, TURIN_CHIP_ID, "Turin")  # a full 64-byte id compares in full


def test_turin_mismatch_refused() -> None:
    other = bytes([TURIN_CHIP_ID[7] ^ 0x80])
    with pytest.raises(VerificationError) as info:
        snp.check_chip_id(TURIN_HWID, TURIN_CHIP_ID[:7] + other + TURIN_CHIP_ID[8:], "Turin")
    assert info.value.field == "report.chip_id"
    assert info.value.expected == TURIN_HWID.hex()
    with pytest.raises(VerificationError) as info:  # AMD: the rest of a Turin CHIP_ID is zero
        snp.check_chip_id(TURIN_HWID, TURIN_CHIP_ID[:63] + b"\x01", "Turin")
    assert info.value.field == "report.chip_id" and "56 zero bytes" in info.value.reason
    _, milan_chip_id = _milan_hwid_and_chip_id()
    with pytest.raises(VerificationError) as info:  # a Milan-form chip id starting with the hwid
        snp.check_chip_id(milan_chip_id[:8], milan_chip_id, "Turin")
    assert info.value.field == "report.chip_id"
    with pytest.raises(VerificationError) as info:
        snp.check_chip_id(TURIN_HWID[:7], TURIN_CHIP_ID, "Turin")
    assert info.value.field == "snp.vcek.hwid"


# --- end to end: a test PKI shaped like AMD's Turin chain -------------------------------------------

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_NOW = datetime(2025, 6, 1, tzinfo=UTC)


def _cert(subject: str, issuer: str, public_key, signer, extensions=()) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - timedelta(days=1))
        .not_valid_after(_NOW + timedelta(days=365))
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    return builder.sign(signer, hashes.SHA384(), rsa_padding=_PSS)


# Turin TCB_VERSION: FMC, bootloader, TEE, SNP in bytes 0-3, microcode in byte 7
_TURIN_TCB = int.from_bytes(bytes([1, 4, 0, 3, 0, 0, 0, 0x48]), "little")


@pytest.fixture(scope="module")
def turin_pki():
    ark_key, ask_key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    vcek_key = ec.generate_private_key(ec.SECP384R1())
    ark = _cert("ARK-Turin", "ARK-Turin", ark_key.public_key(), ark_key)
    ask = _cert("SEV-Turin", "ARK-Turin", ask_key.public_key(), ark_key)
    vcek = _cert(
        "SEV-VCEK",
        "SEV-Turin",
        vcek_key.public_key(),
        ask_key,
        [
            ("1.3.6.1.4.1.3704.1.2", b"\x16\x08Turin-B0"),
            ("1.3.6.1.4.1.3704.1.3.9", b"\x02\x01\x01"),  # FMC
            ("1.3.6.1.4.1.3704.1.3.1", b"\x02\x01\x04"),  # bootloader
            ("1.3.6.1.4.1.3704.1.3.2", b"\x02\x01\x00"),  # TEE
            ("1.3.6.1.4.1.3704.1.3.3", b"\x02\x01\x03"),  # SNP
            ("1.3.6.1.4.1.3704.1.3.8", b"\x02\x01\x48"),  # microcode
            ("1.3.6.1.4.1.3704.1.4", TURIN_HWID),
        ],
    )
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (vcek, ask, ark))
    trust = TrustConfig(options={"snp_certs": pem, "snp_ark_spki_sha256": [snp.spki_sha256(ark)]})
    return vcek_key, trust


def _turin_report(key, *, chip_id: bytes, family: int = 0x1A, model: int = 0x02) -> bytes:
    r = bytearray(snp.REPORT_LEN)
    struct.pack_into("<IIQ", r, 0, 3, 0, 0x30000)  # version 3, no debug
    struct.pack_into("<IIQQI", r, 0x30, 0, 1, _TURIN_TCB, 0, 0)
    r[0x90:0xC0] = b"\x11" * 48
    struct.pack_into("<Q", r, 0x180, _TURIN_TCB)
    r[0x188], r[0x189], r[0x18A] = family, model, 0  # CPUID family, model, stepping
    r[0x1A0:0x1E0] = chip_id
    rr, ss = utils.decode_dss_signature(key.sign(bytes(r[: snp.SIGNED_LEN]), ec.ECDSA(hashes.SHA384())))
    r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
    r[0x2E8:0x330] = ss.to_bytes(72, "little")
    return bytes(r)


def test_genuine_turin_report_verifies(turin_pki) -> None:
    key, trust = turin_pki
    report = verify(
        Evidence(kind="sev-snp", raw=_turin_report(key, chip_id=TURIN_CHIP_ID), report_data=b""), trust, _NOW
    )
    assert report.claims["product"] == "Turin"
    assert report.claims["reported_tcb"] == {"fmc": 1, "bootloader": 4, "tee": 0, "snp": 3, "microcode": 0x48}
    assert report.claims["chip_id"] == TURIN_CHIP_ID.hex()


def test_turin_report_of_another_chip_refused(turin_pki) -> None:
    key, trust = turin_pki
    other = bytes.fromhex("7c3a91e05bd2486e") + bytes(56)
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=_turin_report(key, chip_id=other), report_data=b""), trust, _NOW)
    assert info.value.field == "report.chip_id"


def test_report_cpuid_must_be_the_arks_product(turin_pki) -> None:
    key, trust = turin_pki
    raw = _turin_report(key, chip_id=TURIN_CHIP_ID, family=0x19, model=0x01)  # a Milan CPUID
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), trust, _NOW)
    assert info.value.field == "report.cpuid_fam_id"
    assert (info.value.expected, info.value.actual) == ("Turin", "Milan")
    assert snp.report_product(snp.parse_report(_turin_report(key, chip_id=TURIN_CHIP_ID))) == "Turin"
    assert snp.report_product(snp.parse_report(load_vector("snp/attestation.bin"))) is None  # v2: no CPUID


def test_real_milan_report_still_verifies() -> None:
    raw, vcek, chain = (load_vector(p) for p in ("snp/attestation.bin", "snp/vcek.der", "snp/ask_ark_milan.pem"))
    report = verify(
        Evidence(kind="sev-snp", raw=raw, report_data=b""), TrustConfig(options={"snp_certs": [vcek, chain]}), SNP_TIME
    )
    assert report.claims["product"] == "Milan"
