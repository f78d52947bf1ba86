"""The `sgx-dcap` (quote v3) and `tdx` (quote v4/v5) kinds: Intel DCAP quote verification.

The cryptographic core is `dcap-qvl` (quote signature, QE report signature and binding, PCK
chain to Intel's root, CRLs, TCB info and QE identity signatures, TCB status and advisories).
Around it this module adds what a relying party needs to act on the result:

- a strict parser of the quote layout, so a malformed quote is refused with the field that is
  wrong, and so claims (MRENCLAVE, MRTD, RTMRs, ...) come from the exact bytes verified;
- strict, canonical decoding of every PEM certificate (in the quote and in the collateral) and
  a pinned Intel SGX Root CA: dcap-qvl verifies against its built-in root and skips the root
  copies and some issuer chains it is handed, so without this a changed byte in those copies
  would go unnoticed;
- a freshness check of the collateral that names the expired document;
- translation of dcap-qvl's messages into errors naming the quote or collateral field.

Verification is a pure function of (quote, collateral, time); policy lives in `validate`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from veil.attest.collateral import DcapCollateral, resolve_collateral
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence, VerifiedReport

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TD10_REPORT_LEN = 584
TD15_REPORT_LEN = 648
ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

#: SHA-256 of the DER of Intel's "Intel SGX Root CA" certificate (valid 2018-2049). The last
#: certificate of every chain (in the quote and in the collateral) must be exactly this one.
#: Override with `TrustConfig.options["intel_root_ca_sha256"]` (e.g. for a test PKI).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

_SGX_ATTR_DEBUG = 0x02  # ATTRIBUTES.FLAGS bit 1
_TD_ATTR_DEBUG = 0x01  # TDATTRIBUTES bit 0


def _u16(buf: bytes, off: int) -> int:
    return struct.unpack_from("<H", buf, off)[0]


def _u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def _unpack(fmt: str, raw: bytes, off: int, field_name: str) -> tuple[int, ...]:
    """`struct.unpack_from`, but a quote too short for the field is refused naming the field."""
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(raw):
        raise VerificationError(field_name, "truncated", expected=f">= {off + size} bytes", actual=len(raw))
    return struct.unpack_from(fmt, raw, off)


#: What cryptography raises for a corrupt certificate, at load time (`ValueError`, and
#: `InvalidVersion` for a bad version byte, which is not a ValueError) or when a lazily parsed
#: part (names, extensions, public key, signature algorithm) is first touched.
_CERT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    UnsupportedAlgorithm,
)


@dataclass(frozen=True)
class Quote:
    """A structurally valid DCAP quote: offsets of every part, nothing verified yet.

    `regions` maps part names to (start, end) offsets in `raw`; errors and tests use them to
    say which part of the quote is at fault.
    """

    raw: bytes
    version: int
    tee_type: int
    kind: str
    body: bytes
    body_type: int
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def part(self, name: str) -> bytes:
        start, end = self.regions[name]
        return self.raw[start:end]

    @property
    def report_data(self) -> bytes:
        off = 320 if self.kind == "sgx-dcap" else 520
        return self.body[off : off + 64]

    @property
    def pck_chain_pem(self) -> bytes:
        return self.part("pck_chain")

    def pck_chain(self) -> list[bytes]:
        """The DER certificates of the PCK chain (leaf first), strictly decoded."""
        return pem_chain(self.pck_chain_pem.rstrip(b"\0"), "quote.pck_chain")

    def fmspc(self) -> str:
        """The platform's FMSPC (hex, upper case) from the PCK leaf's SGX extension."""
        leaf = _load_cert(self.pck_chain()[0], "quote.pck_chain[0]")
        sgx_ext = _sgx_extension(leaf, "quote.pck_chain[0]")
        value = _find_der_oid(sgx_ext, _OID_FMSPC)
        if value is None or len(value) != 6:
            raise VerificationError("quote.pck_chain[0]", "PCK certificate has no 6-byte FMSPC")
        return value.hex().upper()

    def pck_ca(self) -> str:
        """`processor` or `platform`: which PCK CA issued the leaf (PCCS needs it)."""
        leaf = _load_cert(self.pck_chain()[0], "quote.pck_chain[0]")
        try:
            issuer = leaf.issuer.rfc4514_string()
        except _CERT_ERRORS as exc:
            raise VerificationError(
                "quote.pck_chain[0].issuer", f"does not parse ({type(exc).__name__}: {exc})"
            ) from None
        return "platform" if "Platform" in issuer else "processor"


def parse_quote(raw: bytes) -> Quote:
    """Parse the layout of an SGX (v3/v4) or TDX (v4/v5) quote; refuse malformed ones.

    Every length field is checked against the bytes present, and nested lengths must add up
    exactly, so no byte inside the signature data is left unaccounted for. Bytes after the
    signature data (some quote generators pad to a buffer size) are ignored: they are covered
    by nothing and carry nothing.
    """
    if len(raw) < HEADER_LEN + 4:
        raise VerificationError("quote", "too short for a DCAP quote", expected=f">= {HEADER_LEN + 4}", actual=len(raw))
    version, key_type, tee_type = _unpack("<HHI", raw, 0, "quote.header")
    if version not in (3, 4, 5):
        raise VerificationError("quote.header.version", "unsupported quote version", expected=[3, 4, 5], actual=version)
    if key_type != ECDSA_P256:
        raise VerificationError(
            "quote.header.attestation_key_type", "only ECDSA P-256 is supported", expected=ECDSA_P256, actual=key_type
        )
    if tee_type == TEE_SGX:
        kind = "sgx-dcap"
    elif tee_type == TEE_TDX:
        kind = "tdx"
    else:
        raise VerificationError(
            "quote.header.tee_type", "neither SGX nor TDX", expected=[TEE_SGX, TEE_TDX], actual=hex(tee_type)
        )
    if kind == "tdx" and version == 3:
        raise VerificationError("quote.header.version", "TDX quotes are v4 or v5", expected=[4, 5], actual=3)
    if raw[12:28] != INTEL_QE_VENDOR_ID:
        raise VerificationError(
            "quote.header.qe_vendor_id",
            "not Intel's quoting enclave",
            expected=INTEL_QE_VENDOR_ID.hex(),
            actual=raw[12:28].hex(),
        )
    regions: dict[str, tuple[int, int]] = {"header": (0, HEADER_LEN)}
    off = HEADER_LEN
    if version == 5:
        body_type, body_len = _unpack("<HI", raw, off, "quote.body_descriptor")
        expected_len = {1: SGX_REPORT_LEN, 2: TD10_REPORT_LEN, 3: TD15_REPORT_LEN}.get(body_type)
        if expected_len is None and body_type == 4:
            expected_len = body_len if body_len >= TD15_REPORT_LEN else None
        if expected_len is None or body_len != expected_len:
            raise VerificationError("quote.body_type", "unknown body type or size", actual=(body_type, body_len))
        if (body_type == 1) != (kind == "sgx-dcap"):
            raise VerificationError("quote.body_type", "body type does not match the TEE type", actual=body_type)
        regions["body_descriptor"] = (off, off + 6)
        off += 6
    else:
        body_type = 1 if kind == "sgx-dcap" else 2
        body_len = SGX_REPORT_LEN if kind == "sgx-dcap" else TD10_REPORT_LEN
    if len(raw) < off + body_len + 4:
        raise VerificationError("quote.body", "truncated", expected=off + body_len + 4, actual=len(raw))
    regions["body"] = (off, off + body_len)
    body = raw[off : off + body_len]
    off += body_len
    regions["signed"] = (0, off)
    (sig_len,) = _unpack("<I", raw, off, "quote.signature_data_len")
    regions["signature_data_len"] = (off, off + 4)
    off += 4
    sig_end = off + sig_len
    if sig_end > len(raw):
        raise VerificationError(
            "quote.signature_data_len", "exceeds the quote", expected=f"<= {len(raw) - off}", actual=sig_len
        )
    if sig_len < 128 + 6:
        raise VerificationError("quote.signature_data_len", "too short", actual=sig_len)
    regions["signature"] = (off, off + 64)
    regions["attestation_key"] = (off + 64, off + 128)
    off += 128
    if version == 3:
        off = _parse_qe_part(raw, off, sig_end, regions, "quote")
        if off != sig_end:
            raise VerificationError(
                "quote.certification_data.size", "does not end the signature data", expected=sig_end, actual=off
            )
    else:
        cert_type, cert_size = _unpack("<HI", raw, off, "quote.certification_data")
        if cert_type != CERT_TYPE_QE_REPORT:
            raise VerificationError(
                "quote.certification_data.type",
                "expected QE report certification data",
                expected=CERT_TYPE_QE_REPORT,
                actual=cert_type,
            )
        regions["outer_certification_header"] = (off, off + 6)
        off += 6
        if off + cert_size != sig_end:
            raise VerificationError(
                "quote.certification_data.size",
                "does not match the signature data length",
                expected=sig_end - off,
                actual=cert_size,
            )
        off = _parse_qe_part(raw, off, sig_end, regions, "quote.certification_data")
        if off != sig_end:
            raise VerificationError(
                "quote.certification_data.size", "inner data does not fill it", expected=sig_end, actual=off
            )
    regions["trailing"] = (sig_end, len(raw))
    return Quote(
        raw=raw, version=version, tee_type=tee_type, kind=kind, body=body, body_type=body_type, regions=regions
    )


def _parse_qe_part(raw: bytes, off: int, end: int, regions: dict[str, tuple[int, int]], where: str) -> int:
    """QE report, its signature, QE auth data and the PCK chain certification data."""
    if off + 384 + 64 + 2 > end:
        raise VerificationError(f"{where}.qe_report", "truncated")
    regions["qe_report"] = (off, off + 384)
    regions["qe_report_signature"] = (off + 384, off + 448)
    off += 448
    (auth_len,) = _unpack("<H", raw, off, f"{where}.qe_auth_data_len")
    regions["qe_auth_data_len"] = (off, off + 2)
    off += 2
    if off + auth_len + 6 > end:
        raise VerificationError(f"{where}.qe_auth_data", "length exceeds the signature data", actual=auth_len)
    regions["qe_auth_data"] = (off, off + auth_len)
    off += auth_len
    cert_type, cert_size = _unpack("<HI", raw, off, f"{where}.pck_chain_header")
    regions["pck_chain_header"] = (off, off + 6)
    if cert_type != CERT_TYPE_PCK_CHAIN:
        raise VerificationError(
            f"{where}.pck_cert_type",
            "only an embedded PCK chain (type 5) is supported",
            expected=CERT_TYPE_PCK_CHAIN,
            actual=cert_type,
        )
    off += 6
    if off + cert_size > end:
        raise VerificationError(
            f"{where}.pck_chain", "size exceeds the signature data", expected=f"<= {end - off}", actual=cert_size
        )
    regions["pck_chain"] = (off, off + cert_size)
    return off + cert_size


# --- strict PEM and certificate helpers -----------------------------------------------------

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\n([A-Za-z0-9+/=\n]+?)-----END CERTIFICATE-----\n?")


def pem_chain(pem: bytes, field_name: str) -> list[bytes]:
    """Decode concatenated PEM certificates strictly: exact markers, canonical base64.

    Canonical means re-encoding the DER gives back the same base64 text, so a flipped bit in
    base64 padding bits (which a lenient decoder maps to the same DER) is also refused.
    Only newlines and NUL bytes may surround the certificates. Memoised: a pure function of
    the bytes (failures are not memoised and are recomputed, with the field named).
    """
    return list(_pem_chain_cached(pem, field_name))


@lru_cache(maxsize=256)
def _pem_chain_cached(pem: bytes, field_name: str) -> tuple[bytes, ...]:
    ders: list[bytes] = []
    pos = 0
    for match in _PEM_RE.finditer(pem):
        if pem[pos : match.start()].strip(b"\n\0"):
            raise VerificationError(f"{field_name}[{len(ders)}]", "unexpected bytes before the certificate")
        text = match.group(1).replace(b"\n", b"")
        try:
            der = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise VerificationError(f"{field_name}[{len(ders)}]", "invalid base64") from None
        if base64.b64encode(der) != text:
            raise VerificationError(f"{field_name}[{len(ders)}]", "non-canonical base64 encoding")
        ders.append(der)
        pos = match.end()
    if pem[pos:].strip(b"\n\0"):
        raise VerificationError(f"{field_name}[{len(ders)}]", "unexpected bytes after the certificates (bad PEM)")
    if not ders:
        raise VerificationError(field_name, "no PEM certificate found")
    return tuple(ders)


@lru_cache(maxsize=256)
def _load_cert_cached(der: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(der)


def _load_cert(der: bytes, field_name: str) -> x509.Certificate:
    """Load a DER certificate; any parse failure (a bad version byte raises cryptography's
    `InvalidVersion`, which is not a ValueError) is a VerificationError naming `field_name`."""
    try:
        return _load_cert_cached(der)
    except _CERT_ERRORS as exc:
        raise VerificationError(field_name, f"not a valid X.509 certificate ({type(exc).__name__}: {exc})") from None


def _public_key(cert: x509.Certificate, field_name: str) -> Any:
    try:
        return cert.public_key()
    except _CERT_ERRORS as exc:
        raise VerificationError(f"{field_name}.public_key", f"does not parse ({type(exc).__name__}: {exc})") from None


@lru_cache(maxsize=256)
def _issued_by(cert_der: bytes, issuer_der: bytes) -> bool:
    """Whether `cert` is signed by `issuer` (cached: chains repeat across verifications)."""
    try:
        _load_cert_cached(cert_der).verify_directly_issued_by(_load_cert_cached(issuer_der))
    except Exception:  # any failure (bad signature, unsupported or corrupt key) = not issued by
        return False
    return True


def check_chain(ders: list[bytes], field_name: str, root_sha256: str, now: datetime) -> list[x509.Certificate]:
    """Each certificate signed by the next, all valid at `now`, the last exactly the pinned root."""
    root_digest = hashlib.sha256(ders[-1]).hexdigest()
    if root_digest != root_sha256:
        raise VerificationError(
            f"{field_name}[{len(ders) - 1}]",
            "chain does not end at the pinned Intel SGX Root CA",
            expected=root_sha256,
            actual=root_digest,
        )
    certs = [_load_cert(der, f"{field_name}[{i}]") for i, der in enumerate(ders)]
    for i, cert in enumerate(certs):
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            raise VerificationError(
                f"{field_name}[{i}].validity",
                "certificate not valid at the verification time",
                expected=f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}",
                actual=now.isoformat(),
            )
        issuer_der = ders[i + 1] if i + 1 < len(ders) else ders[i]
        if not _issued_by(ders[i], issuer_der):
            raise VerificationError(
                f"{field_name}[{i}].signature",
                f"certificate is not signed by {'its issuer' if i + 1 < len(ders) else 'itself'}",
            )
    return certs


# PCK certificate SGX extension (Intel SGX PCK Certificate and CRL Profile).
_OID_SGX_EXT = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_OID_FMSPC = "1.2.840.113741.1.13.1.4"


def _sgx_extension(cert: x509.Certificate, field_name: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(_OID_SGX_EXT)
    except x509.ExtensionNotFound:
        raise VerificationError(field_name, "PCK certificate lacks the SGX extension") from None
    except _CERT_ERRORS as exc:
        raise VerificationError(f"{field_name}.extensions", f"do not parse ({type(exc).__name__}: {exc})") from None
    return ext.value.value  # type: ignore[attr-defined]


def _encode_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = bytearray([parts[0] * 40 + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        out.extend(reversed(chunk))
    return bytes([0x06, len(out)]) + bytes(out)


def _find_der_oid(der: bytes, dotted: str) -> bytes | None:
    """Value (OCTET STRING contents) following `dotted` in the SGX extension's SEQUENCEs."""
    needle = _encode_oid(dotted)
    idx = der.find(needle)
    if idx < 0:
        return None
    pos = idx + len(needle)
    if pos + 2 > len(der) or der[pos] != 0x04:
        return None
    length = der[pos + 1]
    return der[pos + 2 : pos + 2 + length]


# --- collateral checks ---------------------------------------------------------------------


# (collateral digest, root pin) -> the time window in which its chains were found valid
_CHAINS_OK: dict[tuple[str, str], tuple[datetime, datetime]] = {}


def _check_collateral_chains(col: DcapCollateral, root_sha256: str, now: datetime) -> None:
    """Strictly decode and verify the three issuer chains and the CRL signatures.

    The outcome depends only on the collateral bytes, the pinned root and whether `now` lies
    within every certificate's validity, so a success is remembered with that window.
    """
    key = (col.digest, root_sha256)
    window = _CHAINS_OK.get(key)
    if window is not None and window[0] <= now <= window[1]:
        return
    chains = {}
    for name in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        ders = pem_chain(col.fields[name].encode(), f"collateral.{name}")
        chains[name] = check_chain(ders, f"collateral.{name}", root_sha256, now)
    issuers = chains["pck_crl_issuer_chain"]
    for crl_name, index in (("pck_crl", 0), ("root_ca_crl", len(issuers) - 1)):
        crl = _load_crl(col.fields[crl_name])
        if crl is None:
            raise VerificationError(f"collateral.{crl_name}", "not a DER CRL")
        signer_field = f"collateral.pck_crl_issuer_chain[{index}]"
        signer_key = _public_key(issuers[index], signer_field)
        if not isinstance(signer_key, ec.EllipticCurvePublicKey):
            raise VerificationError(f"{signer_field}.public_key", "CRL issuer key is not ECDSA")
        if not _crl_signed_by(crl, signer_key):
            raise VerificationError(f"collateral.{crl_name}", "CRL signature does not verify under its issuer")
    certs = [c for chain in chains.values() for c in chain]
    if len(_CHAINS_OK) > 64:
        _CHAINS_OK.clear()
    _CHAINS_OK[key] = (max(c.not_valid_before_utc for c in certs), min(c.not_valid_after_utc for c in certs))


def _crl_signed_by(crl: x509.CertificateRevocationList, key: Any) -> bool:
    try:
        return bool(crl.is_signature_valid(key))
    except _CERT_ERRORS:  # e.g. a key type cryptography cannot check CRLs with
        return False


@lru_cache(maxsize=64)
def _load_crl(hex_der: str) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_der_x509_crl(bytes.fromhex(hex_der))
    except (ValueError, x509.InvalidVersion):  # a flipped version byte raises InvalidVersion
        return None


# --- dcap-qvl error translation --------------------------------------------------------------

# (substring of dcap-qvl's message, field, reason)
_QVL_ERRORS: tuple[tuple[str, str, str], ...] = (
    (
        "ISV enclave report signature is invalid",
        "quote.signature",
        "does not verify under the attestation key over the quote header and body (header, body or signature altered)",
    ),
    (
        "Signature is invalid for qe_report",
        "quote.qe_report.signature",
        "QE report is not signed by the PCK certificate's key",
    ),
    (
        "QE report hash mismatch",
        "quote.qe_report.report_data",
        "QE report does not bind the attestation key and QE authentication data",
    ),
    ("Signature is invalid for tcb_info", "collateral.tcb_info_signature", "TCB info signature does not verify"),
    (
        "Signature is invalid for qe_identity",
        "collateral.qe_identity_signature",
        "QE identity signature does not verify",
    ),
    ("Failed to decode TcbInfo", "collateral.tcb_info", "TCB info does not parse"),
    ("Failed to decode QeIdentity", "collateral.qe_identity", "QE identity does not parse"),
    ("QE Identity", "collateral.qe_identity", "QE identity does not fit this quote"),
    ("TCB Info", "collateral.tcb_info", "TCB info does not fit this quote"),
    ("TcbInfo", "collateral.tcb_info", "TCB info does not fit this quote"),
    ("Fmspc", "collateral.tcb_info.fmspc", "TCB info is for another platform (FMSPC)"),
    ("FMSPC", "collateral.tcb_info.fmspc", "TCB info is for another platform (FMSPC)"),
    ("root CA CRL", "collateral.root_ca_crl", "root CA CRL rejected"),
    ("PCK CRL", "collateral.pck_crl", "PCK CRL rejected"),
    ("CrlExpired", "collateral.crl", "a CRL is expired"),
    ("Revoked", "quote.pck_chain", "a certificate in the PCK chain is revoked"),
    (
        "Failed to verify certificate chain",
        "quote.pck_chain",
        "PCK chain does not verify to Intel's root (or a CRL does not verify)",
    ),
    ("PCK certificate", "quote.pck_chain", "PCK certificate chain unusable"),
    ("Reserved bits in TD attributes", "quote.body.td_attributes", "reserved TD attribute bits are set"),
    ("SEPT_VE_DISABLE", "quote.body.td_attributes", "SEPT_VE_DISABLE (bit 28) is not set"),
    ("Invalid MR service TD", "quote.body.mrservicetd", "a service TD is bound (MRSERVICETD is not zero)"),
    ("Unknown QE vendor ID", "quote.header.qe_vendor_id", "not Intel's quoting enclave"),
    ("Invalid TEE type", "quote.header.tee_type", "invalid TEE type"),
    ("QE", "quote.qe_report", "quoting enclave report does not match Intel's QE identity"),
    ("TCB", "quote.tcb", "platform TCB could not be evaluated"),
    ("decode quote", "quote", "does not decode"),
)


def _translate(exc: Exception) -> VerificationError:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for needle, field_name, reason in _QVL_ERRORS:
        if needle in message:
            return VerificationError(field_name, f"{reason} [dcap-qvl: {message}]")
    return VerificationError("quote", f"verification failed [dcap-qvl: {message}]")


# --- verification ----------------------------------------------------------------------------


def _collateral_for(evidence: Evidence, trust: Any, now: datetime) -> DcapCollateral:
    data = resolve_collateral(getattr(trust, "collateral", None), evidence, now)
    if data is None:
        raise VerificationError(
            "collateral",
            "no DCAP collateral: configure TrustConfig.collateral (offline file or PCCS) or send it with the evidence",
        )
    return DcapCollateral.parse(data)


def _verify_dcap(evidence: Evidence, trust: Any, now: datetime, expected_kind: str) -> VerifiedReport:
    import dcap_qvl

    if evidence.kind != expected_kind:
        raise VerificationError(
            "kind", "evidence kind does not match the verifier", expected=expected_kind, actual=evidence.kind
        )
    quote = parse_quote(evidence.raw)
    if quote.kind != expected_kind:
        raise VerificationError(
            "quote.header.tee_type",
            "quote is for another TEE than the evidence claims",
            expected=expected_kind,
            actual=quote.kind,
        )
    options = getattr(trust, "options", {}) or {}
    root_sha256 = str(options.get("intel_root_ca_sha256", INTEL_SGX_ROOT_CA_SHA256)).lower()

    collateral = _collateral_for(evidence, trust, now)
    collateral.check_fresh(now)
    pck_ders = quote.pck_chain()
    check_chain(pck_ders, "quote.pck_chain", root_sha256, now)
    _check_collateral_chains(collateral, root_sha256, now)

    now_secs = int(now.timestamp())
    result: Any = None
    try:
        if "intel_root_ca_sha256" in options:
            result = dcap_qvl.verify_with_root_ca(evidence.raw, collateral.qvl, pck_ders[-1], now_secs)
        else:
            result = dcap_qvl.verify(evidence.raw, collateral.qvl, now_secs)
    except ValueError as exc:
        if _QVL_DEBUG_REFUSAL not in str(exc):
            raise _translate(exc) from None
        # dcap-qvl (its Python API has no allow_debug) refuses debug enclaves as its last
        # step; whether debug is acceptable is policy (`validate`), so go on below.

    claims: dict[str, Any] = {
        "quote_version": quote.version,
        "collateral_next_update": collateral.next_update.isoformat(),
        "tcb_info_issue_date": collateral.tcb_info.get("issueDate"),
        "tcb_evaluation_data_number": collateral.tcb_info.get("tcbEvaluationDataNumber"),
        "fmspc": collateral.tcb_info.get("fmspc"),
    }
    if quote.version == 3:
        claims["qe_svn"] = _u16(quote.raw, 8)
        claims["pce_svn"] = _u16(quote.raw, 10)
    if quote.kind == "sgx-dcap":
        measurement, debug = _sgx_claims(quote.body, claims)
    else:
        measurement, debug = _tdx_claims(quote.body, quote.body_type, claims)
    if result is None:
        attributes = "quote.body.attributes" if quote.kind == "sgx-dcap" else "quote.body.td_attributes"
        if not debug:
            raise VerificationError(attributes, "dcap-qvl refused the quote as debug-mode, but its DEBUG bit is clear")
        _check_debug_quote(quote, collateral, pck_ders)
        claims["tcb_evaluated"] = False
        tcb_status, advisories = TCB_NOT_EVALUATED, ()
    else:
        tcb_status, advisories = str(result.status), tuple(sorted(result.advisory_ids))
    return VerifiedReport(
        kind=expected_kind,
        measurement=measurement,
        report_data=quote.report_data,
        debug=debug,
        tcb_status=tcb_status,
        advisories=advisories,
        claims=claims,
    )


#: dcap-qvl's refusal of a debug enclave (SGX ATTRIBUTES.DEBUG, TDX TDATTRIBUTES.DEBUG).
_QVL_DEBUG_REFUSAL = "Debug mode is enabled"

#: `tcb_status` of a debug-mode quote: dcap-qvl refuses to rate debug enclaves, so no TCB status
#: is known. A policy accepting debug quotes (`allow_debug`) must allow this status explicitly.
TCB_NOT_EVALUATED = "NotEvaluated"


def _ecdsa_p256(raw_key: bytes, field_name: str) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_key)
    except ValueError:
        raise VerificationError(field_name, "not a P-256 public key") from None


def _verify_raw_sig(key: Any, signature: bytes, data: bytes) -> bool:
    """ECDSA-P256/SHA-256 with a raw r||s signature (as quotes and collateral carry them)."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        return False
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _check_debug_quote(quote: Quote, col: DcapCollateral, pck_ders: list[bytes]) -> None:
    """Veil's own checks of a debug-mode quote, which dcap-qvl refuses without saying more.

    dcap-qvl checks the debug bit after everything else, so its refusal implies the rest
    verified; this does not rely on that order. With the PCK chain and the collateral chains
    already checked (`check_chain`, `_check_collateral_chains`), it verifies the quote
    signature, the QE report signature and its binding of the attestation key, the QE identity
    (signature and match), that neither PCK certificate is revoked, and, for TDX, the TD
    attributes dcap-qvl would check after DEBUG. Not evaluated: the TCB level (see
    `TCB_NOT_EVALUATED`).
    """
    raw = quote.raw
    ak_raw = quote.part("attestation_key")
    ak = _ecdsa_p256(ak_raw, "quote.attestation_key")
    if not _verify_raw_sig(ak, quote.part("signature"), raw[: quote.regions["signed"][1]]):
        raise VerificationError(
            "quote.signature", "does not verify under the attestation key over the quote header and body"
        )
    leaf = _load_cert(pck_ders[0], "quote.pck_chain[0]")
    qe_report = quote.part("qe_report")
    if not _verify_raw_sig(_public_key(leaf, "quote.pck_chain[0]"), quote.part("qe_report_signature"), qe_report):
        raise VerificationError("quote.qe_report.signature", "QE report is not signed by the PCK certificate's key")
    binding = hashlib.sha256(ak_raw + quote.part("qe_auth_data")).digest() + bytes(32)
    if qe_report[320:384] != binding:
        raise VerificationError(
            "quote.qe_report.report_data",
            "QE report does not bind the attestation key and QE authentication data",
            expected=binding.hex(),
            actual=qe_report[320:384].hex(),
        )
    _check_qe_identity(quote, col, qe_report)
    certs = [_load_cert(der, f"quote.pck_chain[{i}]") for i, der in enumerate(pck_ders)]
    for i, cert in enumerate(certs[:-1]):
        crl_name = "root_ca_crl" if i + 2 == len(certs) else "pck_crl"
        crl = _load_crl(col.fields[crl_name])
        if crl is None:
            raise VerificationError(f"collateral.{crl_name}", "not a DER CRL")
        if not _crl_signed_by(crl, _public_key(certs[i + 1], f"quote.pck_chain[{i + 1}]")):
            raise VerificationError(f"collateral.{crl_name}", f"is not the CRL of the issuer of quote.pck_chain[{i}]")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise VerificationError(
                f"quote.pck_chain[{i}]", f"certificate is revoked (listed in collateral.{crl_name})"
            )
    if quote.kind == "tdx":
        _check_td_attributes(quote.body, quote.body_type)


def _check_qe_identity(quote: Quote, col: DcapCollateral, qe_report: bytes) -> None:
    """The QE report must be of the quoting enclave Intel's signed QE identity describes."""
    chain = pem_chain(col.fields["qe_identity_issuer_chain"].encode(), "collateral.qe_identity_issuer_chain")
    signer = _load_cert(chain[0], "collateral.qe_identity_issuer_chain[0]")
    signature = bytes.fromhex(col.fields["qe_identity_signature"])
    if not _verify_raw_sig(
        _public_key(signer, "collateral.qe_identity_issuer_chain[0]"), signature, col.fields["qe_identity"].encode()
    ):
        raise VerificationError("collateral.qe_identity_signature", "QE identity signature does not verify")
    identity = col.qe_identity
    expected_id = "QE" if quote.kind == "sgx-dcap" else "TD_QE"
    if identity.get("id") != expected_id:
        raise VerificationError(
            "collateral.qe_identity.id",
            "QE identity is for another TEE",
            expected=expected_id,
            actual=identity.get("id"),
        )
    try:
        miscselect, misc_mask = int(identity["miscselect"], 16), int(identity["miscselectMask"], 16)
        attributes, attr_mask = bytes.fromhex(identity["attributes"]), bytes.fromhex(identity["attributesMask"])
        mrsigner, isvprodid = bytes.fromhex(identity["mrsigner"]), int(identity["isvprodid"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError("collateral.qe_identity", f"lacks a QE identity field ({exc})") from None
    if _u32(qe_report, 16) & misc_mask != miscselect:
        raise VerificationError("quote.qe_report.miscselect", "does not match Intel's QE identity")
    masked = bytes(a & m for a, m in zip(qe_report[48:64], attr_mask, strict=False))
    if len(attr_mask) != 16 or masked != attributes:
        raise VerificationError("quote.qe_report.attributes", "do not match Intel's QE identity")
    if qe_report[128:160] != mrsigner:
        raise VerificationError(
            "quote.qe_report.mrsigner",
            "not Intel's QE signer",
            expected=mrsigner.hex(),
            actual=qe_report[128:160].hex(),
        )
    if _u16(qe_report, 256) != isvprodid:
        raise VerificationError(
            "quote.qe_report.isvprodid", "not Intel's QE", expected=isvprodid, actual=_u16(qe_report, 256)
        )


def _check_td_attributes(body: bytes, body_type: int) -> None:
    """The TD attribute rules dcap-qvl applies after DEBUG (Intel TDX module spec, TDATTRIBUTES)."""
    td = int.from_bytes(body[120:128], "little")
    tud_reserved = td & 0xFE  # bits 7:1
    sec_reserved = td & (0x0FFFFF00 | (1 << 29))  # bits 27:8 and 29
    other_reserved = td & 0x7FFFFFFF00000000  # bits 62:32
    if tud_reserved or sec_reserved or other_reserved:
        raise VerificationError("quote.body.td_attributes", "reserved bits are set", actual=body[120:128].hex())
    if not td & (1 << 28):
        raise VerificationError("quote.body.td_attributes", "SEPT_VE_DISABLE (bit 28) is not set")
    if body_type >= 3 and body[600:648] != bytes(48):
        raise VerificationError("quote.body.mrservicetd", "a service TD is bound (MRSERVICETD is not zero)")


def _sgx_claims(body: bytes, claims: dict[str, Any]) -> tuple[str, bool]:
    """SGX REPORTBODY fields (Intel SDM vol. 3D, EREPORT): offsets are architectural."""
    attributes = body[48:64]
    claims.update(
        {
            "cpusvn": body[0:16].hex(),
            "miscselect": _u32(body, 16),
            "isv_ext_prod_id": body[32:48].hex(),
            "attributes": attributes.hex(),
            "mrenclave": body[64:96].hex(),
            "mrsigner": body[128:160].hex(),
            "config_id": body[192:256].hex(),
            "isvprodid": _u16(body, 256),
            "isvsvn": _u16(body, 258),
            "config_svn": _u16(body, 260),
            "isv_family_id": body[304:320].hex(),
        }
    )
    return body[64:96].hex(), bool(attributes[0] & _SGX_ATTR_DEBUG)


def _tdx_claims(body: bytes, body_type: int, claims: dict[str, Any]) -> tuple[str, bool]:
    """TDX TDREPORT/TD quote body fields (Intel TDX DCAP Quoting Library API, appendix A)."""
    td_attributes = body[120:128]
    claims.update(
        {
            "tee_tcb_svn": body[0:16].hex(),
            "mrseam": body[16:64].hex(),
            "mrsignerseam": body[64:112].hex(),
            "seam_attributes": body[112:120].hex(),
            "td_attributes": td_attributes.hex(),
            "xfam": body[128:136].hex(),
            "mrtd": body[136:184].hex(),
            "mrconfigid": body[184:232].hex(),
            "mrowner": body[232:280].hex(),
            "mrownerconfig": body[280:328].hex(),
            "rtmr0": body[328:376].hex(),
            "rtmr1": body[376:424].hex(),
            "rtmr2": body[424:472].hex(),
            "rtmr3": body[472:520].hex(),
        }
    )
    if body_type >= 3:
        claims["tee_tcb_svn2"] = body[584:600].hex()
        claims["mrservicetd"] = body[600:648].hex()
    return body[136:184].hex(), bool(td_attributes[0] & _TD_ATTR_DEBUG)


def verify_sgx(evidence: Evidence, trust: Any, now: datetime) -> VerifiedReport:
    """Verify an SGX DCAP quote (v3; v4/v5 SGX layouts too) at time `now`.

    `measurement` is MRENCLAVE; claims carry MRSIGNER, ISVPRODID, ISVSVN, attributes and the
    collateral's TCB evaluation data. `debug` is ATTRIBUTES.DEBUG.
    """
    return _verify_dcap(evidence, trust, now, "sgx-dcap")


def verify_tdx(evidence: Evidence, trust: Any, now: datetime) -> VerifiedReport:
    """Verify a TDX quote (v4 or v5) at time `now`.

    `measurement` is MRTD; claims carry RTMR0-3, MRCONFIGID, MROWNER, MRSEAM, TD attributes
    and the TCB SVNs. `debug` is TDATTRIBUTES.DEBUG.
    """
    return _verify_dcap(evidence, trust, now, "tdx")


def detect_kind(raw: bytes) -> str | None:
    """`sgx-dcap` or `tdx` if `raw` looks like a DCAP quote header, else None."""
    if len(raw) < HEADER_LEN:
        return None
    version, key_type, tee_type = struct.unpack_from("<HHI", raw, 0)
    if version not in (3, 4, 5) or key_type != ECDSA_P256 or raw[12:28] != INTEL_QE_VENDOR_ID:
        return None
    return {TEE_SGX: "sgx-dcap", TEE_TDX: "tdx"}.get(tee_type)
