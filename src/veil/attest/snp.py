"""The `sev-snp` kind: AMD SEV-SNP attestation reports, verified with `cryptography` alone.

A report (1184 bytes; version 2, also 3 and 5 which keep the same signed layout) is signed
with ECDSA P-384 over its first 0x2A0 bytes by the chip's VCEK (or a cloud's VLEK). The VCEK is
certified by AMD's ASK (or ASVK for VLEKs) and the ASK by the ARK, AMD's root for the product
line (Milan, Genoa, Turin). Verification here:

1. parses the report, refusing unknown versions and signature algorithms;
2. pins the ARK by the SHA-256 of its public key (SPKI), checks it is self-signed, and checks
   ASK/ASVK ← ARK and VCEK/VLEK ← ASK/ASVK signatures (RSA-PSS) and validity at `now`;
3. verifies the report signature under the VCEK/VLEK;
4. checks the VCEK's AMD extensions against the report: the TCB component SPLs must equal the
   report's REPORTED_TCB and the hardware id must be CHIP_ID (`check_chip_id`: 64 bytes on
   Milan and Genoa; 8 bytes on Turin, where CHIP_ID is those 8 bytes and 56 zero bytes), so a
   VCEK of another chip or another TCB cannot be passed off as this one's. A v3+ report's CPUID
   family/model, when it names a known product, must be the ARK's product.

Certificates come from (first that has them): the configured collateral source, the evidence's
`collateral` (the configfs-tsm `auxblob`: the GHCB certificate table), and
`TrustConfig.options["snp_certs"]` (PEM bundle, DER, certificate table, or a list of them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from veil.attest.collateral import resolve_collateral
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence, VerifiedReport

KIND = "sev-snp"
REPORT_LEN = 0x4A0
SIGNED_LEN = 0x2A0
SIG_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = (2, 3, 5)

#: SHA-256 of each ARK's SubjectPublicKeyInfo (DER), computed from AMD's published ARK
#: certificates (kdsintf.amd.com/vcek/v1/<product>/cert_chain). Pinning the key rather than
#: the certificate keeps a re-issued ARK with the same key valid.
#: Override with `TrustConfig.options["snp_ark_spki_sha256"]` (an iterable of hex digests).
AMD_ARK_SPKI_SHA256: dict[str, str] = {
    "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
    "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
    "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
}

# GHCB spec: GUIDs of the extended-report certificate table.
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_GUID_ROLES = {GUID_VCEK: "vcek", GUID_VLEK: "vlek", GUID_ASK: "ask", GUID_ARK: "ark"}

# AMD VCEK/VLEK certificate extensions (AMD "Versioned Chip Endorsement Key" spec).
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"

#: What cryptography raises for a corrupt certificate: at load time `ValueError`, or
#: `InvalidVersion` for a bad version byte (not a ValueError); when a lazily parsed part is first
#: touched, also KeyError/TypeError (names), `DuplicateExtension`, `UnsupportedAlgorithm`.
_CERT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    UnsupportedAlgorithm,
)

#: Hardware id (VCEK extension 1.3.6.1.4.1.3704.1.4) length per product; CHIP_ID is 64 bytes.
CHIP_ID_LEN = 64
TURIN_HWID_LEN = 8

# Guest policy bits (SEV-SNP ABI, "Guest Policy").
POLICY_SMT = 1 << 16
POLICY_RESERVED_1 = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20


def decode_tcb(value: int, product: str) -> dict[str, int]:
    """Split a TCB_VERSION into its security patch levels (layout differs on Turin)."""
    b = value.to_bytes(8, "little")
    if product == "Turin":
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


def decode_policy(policy: int) -> dict[str, Any]:
    return {
        "abi_minor": policy & 0xFF,
        "abi_major": (policy >> 8) & 0xFF,
        "smt": bool(policy & POLICY_SMT),
        "migrate_ma": bool(policy & POLICY_MIGRATE_MA),
        "debug": bool(policy & POLICY_DEBUG),
        "single_socket": bool(policy & POLICY_SINGLE_SOCKET),
    }


@dataclass(frozen=True)
class SnpReport:
    """The fields of an attestation report that Veil uses (SEV-SNP ABI, ATTESTATION_REPORT)."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    key_flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    chip_id: bytes
    committed_tcb: int
    current_version: str
    committed_version: str
    launch_tcb: int
    sig_r: int
    sig_s: int

    @property
    def signing_key(self) -> str:
        """`vcek`, `vlek` or `none` (bits 4:2 of the key flags)."""
        return {0: "vcek", 1: "vlek", 7: "none"}.get((self.key_flags >> 2) & 0x7, "reserved")

    @property
    def chip_id_masked(self) -> bool:
        return bool(self.key_flags & 0x2)

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse_report(raw: bytes) -> SnpReport:
    """Parse an SEV-SNP attestation report; refuse wrong sizes, versions and algorithms."""
    if len(raw) != REPORT_LEN:
        raise VerificationError("report", "wrong size for an SEV-SNP report", expected=REPORT_LEN, actual=len(raw))
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
    if version not in SUPPORTED_VERSIONS:
        raise VerificationError(
            "report.version", "unsupported report version", expected=list(SUPPORTED_VERSIONS), actual=version
        )
    vmpl, sig_algo, current_tcb, platform_info, key_flags = struct.unpack_from("<IIQQI", raw, 0x30)
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise VerificationError(
            "report.signature_algo", "only ECDSA P-384 with SHA-384 is defined", expected=1, actual=sig_algo
        )

    def ver(off: int) -> str:
        build, minor, major = raw[off], raw[off + 1], raw[off + 2]
        return f"{major}.{minor}.{build}"

    return SnpReport(
        raw=raw,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=vmpl,
        signature_algo=sig_algo,
        current_tcb=current_tcb,
        platform_info=platform_info,
        key_flags=key_flags,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=struct.unpack_from("<Q", raw, 0x180)[0],
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=struct.unpack_from("<Q", raw, 0x1E0)[0],
        current_version=ver(0x1E8),
        committed_version=ver(0x1EC),
        launch_tcb=struct.unpack_from("<Q", raw, 0x1F0)[0],
        sig_r=int.from_bytes(raw[0x2A0:0x2E8], "little"),
        sig_s=int.from_bytes(raw[0x2E8:0x330], "little"),
    )


# --- certificates ----------------------------------------------------------------------------


def _load_cert(der: bytes, field: str) -> x509.Certificate:
    """Load a DER certificate; every parse failure (including cryptography's `InvalidVersion`
    for a bad version byte, which is not a ValueError) is a VerificationError naming `field`."""
    try:
        with warnings.catch_warnings():
            # AMD's VCEKs have serial numbers cryptography warns about; they are still AMD's.
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(der)
    except _CERT_ERRORS as exc:
        raise VerificationError(field, f"not a valid X.509 certificate ({type(exc).__name__}: {exc})") from None


def parse_cert_table(blob: bytes) -> list[tuple[str, bytes]]:
    """Entries (role, DER) of a GHCB certificate table (the `auxblob` of configfs-tsm).

    The table is a list of (GUID, offset, length) entries ended by an all-zero entry; offsets
    are from the start of the table. GUIDs are matched in both byte orders seen in the wild.
    """
    out: list[tuple[str, bytes]] = []
    pos = 0
    while True:
        if pos + 24 > len(blob):
            raise VerificationError("snp.cert_table", "no terminating entry")
        guid_bytes = blob[pos : pos + 16]
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        if guid_bytes == bytes(16):
            return out
        role = _GUID_ROLES.get(uuid.UUID(bytes=guid_bytes)) or _GUID_ROLES.get(uuid.UUID(bytes_le=guid_bytes))
        if offset + length > len(blob) or offset < pos + 24:
            raise VerificationError(
                "snp.cert_table", f"entry {len(out)} points outside the table", actual=(offset, length)
            )
        if role is not None:
            out.append((role, blob[offset : offset + length]))
        pos += 24


def _role_from_subject(cert: x509.Certificate) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except Exception:  # cryptography parses names lazily; a corrupt name is an unusable cert
        return "unknown"
    return _role_from_cn(str(names[0].value) if names else "")


def _role_from_cn(cn: str) -> str:
    if cn == "SEV-VCEK":
        return "vcek"
    if cn == "SEV-VLEK":
        return "vlek"
    if cn.startswith("ARK-"):
        return "ark"
    if cn.startswith("SEV-VLEK-"):
        return "asvk"
    if cn.startswith("SEV-"):
        return "ask"
    return "unknown"


def _der_tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at `pos`; ValueError if malformed."""
    if pos + 2 > len(buf):
        raise ValueError("truncated")
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(buf):
            raise ValueError("bad length")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > len(buf):
        raise ValueError("truncated")
    return tag, pos, pos + length


def _role_hint(der: bytes) -> str:
    """Best-effort role of a certificate cryptography cannot load, from its subject CN, so the
    error can say which certificate it is (e.g. a VCEK with a corrupt version byte)."""
    try:
        _, pos, _ = _der_tlv(der, 0)  # Certificate
        _, pos, end = _der_tlv(der, pos)  # TBSCertificate
        fields = []
        while pos < end and len(fields) < 7:
            tag, start, stop = _der_tlv(der, pos)
            fields.append((tag, start, stop))
            pos = stop
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        _, start, stop = fields[4]  # serial, signature, issuer, validity, subject
        subject = der[start:stop]
        idx = subject.find(b"\x06\x03\x55\x04\x03")  # OID commonName
        if idx < 0:
            return "unknown"
        _, vstart, vend = _der_tlv(subject, idx + 5)
        return _role_from_cn(subject[vstart:vend].decode("ascii"))
    except (ValueError, IndexError):
        return "unknown"


def _field(index: int, role: str) -> str:
    return f"snp.certs[{index}]" + (f" ({role})" if role != "unknown" else "")


def _load_indexed(data: bytes, index: int, *, pem: bool) -> x509.Certificate:
    """Load certificate `index` of the supplied ones (DER, or one PEM block); a failure names it
    `snp.certs[index] (<role>)`, the role read from the raw subject when it can be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AMD's VCEK serial numbers; see _load_cert
            return x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
    except _CERT_ERRORS as exc:
        der = data
        if pem:
            try:
                der = base64.b64decode(b"".join(data.splitlines()[1:-1]), validate=True)
            except (ValueError, binascii.Error):
                der = b""
        raise VerificationError(
            _field(index, _role_hint(der)), f"not a valid X.509 certificate ({type(exc).__name__}: {exc})"
        ) from None


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


def certs_from_blob(blob: bytes, first_index: int = 0) -> list[tuple[str, x509.Certificate]]:
    """Certificates (role, cert) from a certificate table, a PEM bundle or one DER certificate.

    A certificate that does not load is a VerificationError naming it: `snp.<role>` for a table
    entry (role from its GUID), else `snp.certs[i] (<role>)` with `i` counting from
    `first_index` and the role read from the subject when it can be.
    """
    if len(blob) >= 24 and (
        uuid.UUID(bytes=blob[:16]) in _GUID_ROLES
        or uuid.UUID(bytes_le=blob[:16]) in _GUID_ROLES
        or blob[:24] == bytes(24)
    ):
        out = []
        for role, der in parse_cert_table(blob):
            cert = _load_cert(der, f"snp.{role}")
            # the table's ASK slot carries the ASVK when the key is a VLEK
            out.append(("asvk" if role == "ask" and _role_from_subject(cert) == "asvk" else role, cert))
        return out
    if b"-----BEGIN CERTIFICATE-----" in blob:
        out = []
        for i, block in enumerate(_PEM_BLOCK.findall(blob)):
            cert = _load_indexed(block, first_index + i, pem=True)
            out.append((_role_from_subject(cert), cert))
        if len(out) != blob.count(b"-----BEGIN CERTIFICATE-----"):
            raise VerificationError(_field(first_index + len(out), "unknown"), "PEM certificate without its END line")
        return out
    cert = _load_indexed(blob, first_index, pem=False)
    return [(_role_from_subject(cert), cert)]


def _cert_sources(evidence: Evidence, trust: Any, now: datetime) -> list[tuple[str, x509.Certificate]]:
    blobs: list[bytes] = []
    data = resolve_collateral(getattr(trust, "collateral", None), evidence, now)
    if data:
        blobs.append(data)
    if evidence.collateral and evidence.collateral is not data:
        blobs.append(evidence.collateral)
    extra = (getattr(trust, "options", {}) or {}).get("snp_certs")
    if isinstance(extra, bytes | bytearray):
        blobs.append(bytes(extra))
    elif extra:
        blobs.extend(bytes(b) for b in extra)
    certs: list[tuple[str, x509.Certificate]] = []
    for blob in blobs:
        for role, cert in certs_from_blob(blob, first_index=len(certs)):
            _parse_eagerly(cert, _field(len(certs), role))
            certs.append((role, cert))
    return certs


def _parse_eagerly(cert: x509.Certificate, field: str) -> None:
    """Touch every part used later, so a corrupt certificate is named here, not deep inside."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography warns about corrupt names it still parses
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
            cert.public_key()
            list(cert.extensions)
            cert.signature_hash_algorithm  # noqa: B018
            cert.not_valid_before_utc  # noqa: B018
            cert.not_valid_after_utc  # noqa: B018
    except Exception as exc:  # any parse failure of any part: the certificate is unusable
        raise VerificationError(field, f"certificate is malformed ({type(exc).__name__}: {exc})") from None
    _check_outer_encoding(_der(cert), field)


def _check_outer_encoding(der: bytes, field: str) -> None:
    """The parts of a certificate outside the signed TBSCertificate must be exact DER too.

    cryptography ignores the signature BIT STRING's unused-bits octet, so without this a changed
    byte there (outside what the signature covers) would go unnoticed. RFC 5280 4.1.1.2: the
    outer signatureAlgorithm must equal the TBSCertificate's signature field.
    """
    try:
        _, pos, end = _der_tlv(der, 0)
        if end != len(der):
            raise ValueError("bytes after the certificate")
        _, tbs_start, tbs_end = _der_tlv(der, pos)
        _, _, alg_end = _der_tlv(der, tbs_end)
        tag, sig_start, sig_end = _der_tlv(der, alg_end)
        if sig_end != end or tag != 0x03 or sig_start == sig_end or der[sig_start] != 0:
            raise ValueError("signature is not a BIT STRING with no unused bits")
        tag, _, pos = _der_tlv(der, tbs_start)
        if tag == 0xA0:  # [0] version
            tag, _, pos = _der_tlv(der, pos)
        if tag != 0x02:
            raise ValueError("TBSCertificate has no serialNumber")
        _, _, stop = _der_tlv(der, pos)  # TBSCertificate.signature
        if der[pos:stop] != der[tbs_end:alg_end]:
            raise ValueError("signatureAlgorithm differs from the TBSCertificate's signature field")
    except (ValueError, IndexError) as exc:
        raise VerificationError(f"{field}.signature", f"certificate encoding is not exact DER ({exc})") from None


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@lru_cache(maxsize=128)
def _signed_by(cert_der: bytes, issuer_der: bytes) -> bool:
    """Signature check of `cert` under `issuer` (RSA-PSS for AMD's chain); cached per pair."""
    try:
        _load_cert(cert_der, "cert").verify_directly_issued_by(_load_cert(issuer_der, "issuer"))
    except Exception:  # invalid signature, unsupported parameters, corrupt key: not signed by
        return False
    return True


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _check_validity(cert: x509.Certificate, field: str, now: datetime) -> None:
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise VerificationError(
            f"{field}.validity",
            "certificate not valid at the verification time",
            expected=f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}",
            actual=now.isoformat(),
        )


def _product_of(ark: x509.Certificate) -> str:
    names = ark.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if not cn.startswith("ARK-"):
        raise VerificationError(
            "snp.ark.subject", "ARK common name does not name its product (ARK-<product>)", actual=cn
        )
    return cn.removeprefix("ARK-")


def report_product(report: SnpReport) -> str | None:
    """The product a v3+ report's CPUID family/model name (None: v2 report, or unknown model).

    Models as AMD's processor programming references list them (and virtee's snpguest maps
    them): family 19h models 00h-0Fh Milan, 10h-1Fh and A0h-AFh Genoa (Siena is a Genoa);
    family 1Ah models 00h-11h Turin.
    """
    if report.version < 3:
        return None
    family, model = report.raw[0x188], report.raw[0x189]
    if family == 0x19 and model <= 0x0F:
        return "Milan"
    if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
        return "Genoa"
    if family == 0x1A and model <= 0x11:
        return "Turin"
    return None


def _verify_chain(
    certs: list[tuple[str, x509.Certificate]], key_role: str, pins: set[str], now: datetime
) -> tuple[list[x509.Certificate], x509.Certificate, str]:
    """Find a pinned ARK, the intermediate it signs and the endorsement keys that intermediate signs."""
    arks = [c for role, c in certs if role == "ark"]
    if not arks:
        raise VerificationError(
            "snp.ark", "no ARK certificate supplied (cert table, evidence collateral or options['snp_certs'])"
        )
    ark = next((c for c in arks if spki_sha256(c) in pins), None)
    if ark is None:
        raise VerificationError(
            "snp.ark",
            "ARK public key is not a pinned AMD root",
            expected=sorted(pins),
            actual=[spki_sha256(c) for c in arks],
        )
    ark_der = _der(ark)
    if not _signed_by(ark_der, ark_der):
        raise VerificationError("snp.ark.signature", "ARK is not self-signed")
    _check_validity(ark, "snp.ark", now)
    inter_role = "asvk" if key_role == "vlek" else "ask"
    inters = [c for role, c in certs if role == inter_role]
    if not inters:
        raise VerificationError(f"snp.{inter_role}", f"no {inter_role.upper()} certificate supplied")
    inter = next((c for c in inters if _signed_by(_der(c), ark_der)), None)
    if inter is None:
        raise VerificationError(f"snp.{inter_role}.signature", f"{inter_role.upper()} is not signed by the ARK")
    _check_validity(inter, f"snp.{inter_role}", now)
    keys = [c for role, c in certs if role == key_role]
    if not keys:
        raise VerificationError(f"snp.{key_role}", f"no {key_role.upper()} certificate supplied")
    inter_der = _der(inter)
    signed = [c for c in keys if _signed_by(_der(c), inter_der)]
    if not signed:
        raise VerificationError(
            f"snp.{key_role}.signature", f"{key_role.upper()} is not signed by the {inter_role.upper()}"
        )
    for c in signed:
        _check_validity(c, f"snp.{key_role}", now)
    return signed, ark, _product_of(ark)


def _ext_bytes(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    return ext.value.value  # type: ignore[attr-defined]


def _der_int(value: bytes, field: str) -> int:
    """A DER INTEGER (as AMD encodes the SPL extensions)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2:
        raise VerificationError(field, "not a DER INTEGER")
    return int.from_bytes(value[2:], "big", signed=True)


def _check_vcek_extensions(key: x509.Certificate, role: str, report: SnpReport, product: str) -> dict[str, int]:
    """The endorsement key's TCB and hardware id must be the report's (AMD VCEK spec)."""
    name = _ext_bytes(key, _OID_PRODUCT_NAME)
    if name is not None and len(name) > 2 and name[0] == 0x16:
        cert_product = name[2:].decode(errors="replace").split("-")[0]
        if cert_product != product:
            raise VerificationError(
                f"snp.{role}.product_name",
                "endorsement key is for another product than the ARK",
                expected=product,
                actual=cert_product,
            )
    reported = decode_tcb(report.reported_tcb, product)
    oids = {
        "bootloader": _OID_BL_SPL,
        "tee": _OID_TEE_SPL,
        "snp": _OID_SNP_SPL,
        "microcode": _OID_UCODE_SPL,
        "fmc": _OID_FMC_SPL,
    }
    for component, value in reported.items():
        raw = _ext_bytes(key, oids[component])
        if raw is None:
            if role == "vcek":
                raise VerificationError(f"snp.{role}.tcb.{component}", "VCEK lacks this TCB extension")
            continue
        spl = _der_int(raw, f"snp.{role}.tcb.{component}")
        if spl != value:
            raise VerificationError(
                f"snp.{role}.tcb.{component}",
                "VCEK certifies another TCB than the report's REPORTED_TCB",
                expected=spl,
                actual=value,
            )
    if role == "vcek" and not report.chip_id_masked:
        hwid = _ext_bytes(key, _OID_HWID)
        if hwid is None:
            raise VerificationError("snp.vcek.hwid", "VCEK lacks the hardware id extension")
        check_chip_id(hwid, report.chip_id, product)
    return reported


def _unwrap_hwid(value: bytes) -> bytes:
    """The hardware id in the extension: raw bytes (as AMD's KDS has long issued it), or the same
    bytes as a DER OCTET STRING. The lengths (8 or 64 raw, 10 or 66 wrapped) cannot collide."""
    if len(value) in (TURIN_HWID_LEN + 2, CHIP_ID_LEN + 2) and value[0] == 0x04 and value[1] == len(value) - 2:
        return value[2:]
    return value


def check_chip_id(hwid_ext: bytes, chip_id: bytes, product: str) -> None:
    """The VCEK's hardware id must be the report's CHIP_ID (AMD VCEK spec, SEV-SNP ABI).

    Milan and Genoa: a 64-byte hwid equal to the 64-byte CHIP_ID. Turin: the hwid is 8 bytes,
    the first 8 bytes of CHIP_ID, and AMD specifies the other 56 bytes of a Turin CHIP_ID as
    zero, so they must be. (A 64-byte hwid is compared in full on any product.)
    """
    hwid = _unwrap_hwid(hwid_ext)
    if len(chip_id) != CHIP_ID_LEN:
        raise VerificationError("report.chip_id", "wrong size", expected=CHIP_ID_LEN, actual=len(chip_id))
    if len(hwid) == CHIP_ID_LEN:
        if hwid != chip_id:
            raise VerificationError(
                "report.chip_id",
                "report is from another chip than the VCEK's",
                expected=hwid.hex(),
                actual=chip_id.hex(),
            )
        return
    if len(hwid) != TURIN_HWID_LEN or product != "Turin":
        raise VerificationError(
            "snp.vcek.hwid",
            f"hardware id has the wrong size for {product}",
            expected=TURIN_HWID_LEN if product == "Turin" else CHIP_ID_LEN,
            actual=len(hwid),
        )
    if chip_id[:TURIN_HWID_LEN] != hwid:
        raise VerificationError(
            "report.chip_id",
            "report is from another chip than the VCEK's (Turin: the first 8 bytes are the hwid)",
            expected=hwid.hex(),
            actual=chip_id[:TURIN_HWID_LEN].hex(),
        )
    if any(chip_id[TURIN_HWID_LEN:]):
        raise VerificationError(
            "report.chip_id",
            "a Turin CHIP_ID is the 8-byte hwid followed by 56 zero bytes",
            expected="00" * (CHIP_ID_LEN - TURIN_HWID_LEN),
            actual=chip_id[TURIN_HWID_LEN:].hex(),
        )


def verify_report_signature(report: SnpReport, key: x509.Certificate) -> bool:
    """ECDSA P-384/SHA-384 over the first 0x2A0 bytes; r and s are little-endian in the report."""
    public = key.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp384r1":
        return False
    try:
        public.verify(
            utils.encode_dss_signature(report.sig_r, report.sig_s), report.raw[:SIGNED_LEN], ec.ECDSA(hashes.SHA384())
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def _pins(options: dict[str, Any]) -> set[str]:
    configured: Iterable[str] | None = options.get("snp_ark_spki_sha256")
    if configured is None:
        return set(AMD_ARK_SPKI_SHA256.values())
    return {p.lower() for p in configured}


def verify_snp(evidence: Evidence, trust: Any, now: datetime) -> VerifiedReport:
    """Verify an SEV-SNP report at `now` (see the module docstring for the checks).

    `measurement` is MEASUREMENT (hex); `debug` is the guest policy's DEBUG bit. SNP has no
    TCB status service, so `tcb_status` is "NotRated"; minimum TCBs are policy
    (`Policy.snp_min_tcb`). The decoded REPORTED_TCB, guest policy, chip id, VMPL, host data and
    id/author key digests are in `claims`.
    """
    if evidence.kind != KIND:
        raise VerificationError(
            "kind", "evidence kind does not match the verifier", expected=KIND, actual=evidence.kind
        )
    report = parse_report(evidence.raw)
    key_role = report.signing_key
    if key_role not in ("vcek", "vlek"):
        raise VerificationError("report.signing_key", "report is not signed by a VCEK or VLEK", actual=key_role)
    options = getattr(trust, "options", {}) or {}
    try:
        certs = _cert_sources(evidence, trust, now)
        keys, ark, product = _verify_chain(certs, key_role, _pins(options), now)
        key = next((k for k in keys if verify_report_signature(report, k)), None)
        if key is None:
            raise VerificationError(
                "report.signature", f"does not verify under the {key_role.upper()} over the report's first 0x2A0 bytes"
            )
        cpuid_product = report_product(report)
        if cpuid_product is not None and cpuid_product != product:
            raise VerificationError(
                "report.cpuid_fam_id",
                "report's CPUID family/model is another product than the ARK's",
                expected=product,
                actual=cpuid_product,
            )
        reported = _check_vcek_extensions(key, key_role, report, product)
    except _CERT_ERRORS as exc:
        # cryptography parses certificate parts lazily: a corrupt part surfaces here
        raise VerificationError("snp.certs", f"a certificate is malformed ({type(exc).__name__}: {exc})") from None
    claims: dict[str, Any] = {
        "report_version": report.version,
        "product": product,
        "signing_key": key_role,
        "guest_svn": report.guest_svn,
        "policy": report.policy,
        "policy_flags": decode_policy(report.policy),
        "vmpl": report.vmpl,
        "platform_info": report.platform_info,
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "report_id": report.report_id.hex(),
        "chip_id": report.chip_id.hex(),
        "reported_tcb": reported,
        "current_tcb": decode_tcb(report.current_tcb, product),
        "committed_tcb": decode_tcb(report.committed_tcb, product),
        "launch_tcb": decode_tcb(report.launch_tcb, product),
        "firmware_version": report.current_version,
        "ark_spki_sha256": spki_sha256(ark),
    }
    return VerifiedReport(
        kind=KIND,
        measurement=report.measurement.hex(),
        report_data=report.report_data,
        debug=report.debug,
        tcb_status="NotRated",
        advisories=(),
        claims=claims,
    )


def detect(raw: bytes) -> bool:
    """Whether `raw` looks like an SEV-SNP report (size, version, signature algorithm)."""
    if len(raw) != REPORT_LEN:
        return False
    version = struct.unpack_from("<I", raw, 0)[0]
    return version in SUPPORTED_VERSIONS and struct.unpack_from("<I", raw, 0x34)[0] == SIG_ALGO_ECDSA_P384_SHA384
