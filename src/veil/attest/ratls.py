"""RA-TLS certificates (Gramine's): evidence carried in a self-signed X.509 certificate.

Gramine's `ra_tls_attest` puts the quote into the certificate twice (since Gramine 1.8):

- TCG DICE tagged evidence, OID 2.23.133.5.4.9: CBOR tag 60000 around the array
  `[quote: bstr, claims: bstr]`, where `claims` is a serialized CBOR map
  `{"pubkey-hash": bstr(serialized [hash-alg-id, hash])}` (hash-alg-id from IANA's Named
  Information registry: 1 = SHA-256) over the certificate's DER SubjectPublicKeyInfo, and the
  quote's report data is SHA-256(claims) followed by 32 zero bytes;
- legacy, OID 1.2.840.113741.1337.6: the raw quote, whose report data is SHA-256(SPKI) followed
  by zeros.

A certificate is accepted only if every evidence extension it carries binds its public key;
the quote itself is then verified like any other evidence.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence, VerifiedReport

OID_TCG_DICE_TAGGED_EVIDENCE = x509.ObjectIdentifier("2.23.133.5.4.9")
OID_GRAMINE_LEGACY_QUOTE = x509.ObjectIdentifier("1.2.840.113741.1337.6")
CBOR_TAG_TEE_QUOTE = 60000
_HASH_ALGS = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}


# --- minimal CBOR decoding (definite lengths; what the tagged evidence uses) ------------------


def _cbor_item(buf: bytes, pos: int, depth: int = 0) -> tuple[Any, int]:
    if depth > 8:
        raise ValueError("nesting too deep")
    if pos >= len(buf):
        raise ValueError("truncated")
    initial = buf[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        arg = info
    elif info in (24, 25, 26, 27):
        size = 1 << (info - 24)
        if pos + size > len(buf):
            raise ValueError("truncated argument")
        arg = int.from_bytes(buf[pos : pos + size], "big")
        pos += size
    else:
        raise ValueError("indefinite lengths are not supported")
    if major == 0:
        return arg, pos
    if major in (2, 3):
        if pos + arg > len(buf):
            raise ValueError("truncated string")
        data = buf[pos : pos + arg]
        return (data if major == 2 else data.decode()), pos + arg
    if major == 4:
        items = []
        for _ in range(arg):
            item, pos = _cbor_item(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        mapping = {}
        for _ in range(arg):
            key, pos = _cbor_item(buf, pos, depth + 1)
            value, pos = _cbor_item(buf, pos, depth + 1)
            mapping[key] = value
        return mapping, pos
    if major == 6:
        item, pos = _cbor_item(buf, pos, depth + 1)
        return ("tag", arg, item), pos
    raise ValueError(f"unsupported CBOR major type {major}")


def cbor_decode(buf: bytes) -> Any:
    """Decode one CBOR item that must span all of `buf`."""
    item, end = _cbor_item(buf, 0)
    if end != len(buf):
        raise ValueError("trailing bytes after the CBOR item")
    return item


# --- extraction and binding --------------------------------------------------------------------


@dataclass(frozen=True)
class RaTlsEvidence:
    """The evidence found in an RA-TLS certificate, and the key it was checked to bind."""

    evidence: Evidence
    public_key_spki: bytes
    formats: tuple[str, ...]


#: What cryptography raises for a corrupt certificate (at load: ValueError, or InvalidVersion for
#: a bad version byte, which is not a ValueError; on first use of a lazily parsed part: more).
_CERT_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    UnsupportedAlgorithm,
)


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except _CERT_ERRORS as exc:
        raise VerificationError(
            "ratls.certificate", f"not an X.509 certificate ({type(exc).__name__}: {exc})"
        ) from None


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_oid(oid).value.value  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        return None
    except _CERT_ERRORS as exc:
        raise VerificationError("ratls.certificate.extensions", f"do not parse ({type(exc).__name__}: {exc})") from None


def _quote_kind(quote: bytes) -> str:
    from veil.attest.dcap import parse_quote

    return parse_quote(quote).kind


def _report_data(quote: bytes) -> bytes:
    from veil.attest.dcap import parse_quote

    return parse_quote(quote).report_data


def _check_binding(field: str, quote: bytes, expected_first_half: bytes) -> None:
    expected = expected_first_half.ljust(64, b"\0")
    actual = _report_data(quote)
    if not hmac.compare_digest(actual, expected):
        raise VerificationError(
            field,
            "quote report data does not bind the certificate's public key",
            expected=expected.hex(),
            actual=actual.hex(),
        )


def _tagged(value: bytes, spki: bytes) -> bytes:
    try:
        item = cbor_decode(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError("ratls.tagged_evidence", f"not CBOR ({exc})") from None
    if not (isinstance(item, tuple) and item[0] == "tag"):
        raise VerificationError("ratls.tagged_evidence", "not a CBOR tag")
    if item[1] != CBOR_TAG_TEE_QUOTE:
        raise VerificationError(
            "ratls.tagged_evidence.tag", "unsupported evidence type", expected=CBOR_TAG_TEE_QUOTE, actual=item[1]
        )
    body = item[2]
    if not (isinstance(body, list) and len(body) == 2 and all(isinstance(b, bytes) for b in body)):
        raise VerificationError("ratls.tagged_evidence", "must be [quote: bstr, claims: bstr]")
    quote, claims_raw = body
    try:
        claims = cbor_decode(claims_raw)
        hash_entry = cbor_decode(claims["pubkey-hash"])
        alg_id, digest = hash_entry
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise VerificationError("ratls.tagged_evidence.claims", f"no valid pubkey-hash claim ({exc})") from None
    hasher = _HASH_ALGS.get(alg_id) if isinstance(alg_id, int) else None
    if hasher is None or not isinstance(digest, bytes):
        raise VerificationError(
            "ratls.tagged_evidence.claims.pubkey-hash",
            "unsupported hash algorithm",
            expected=sorted(_HASH_ALGS),
            actual=alg_id,
        )
    if not hmac.compare_digest(hasher(spki).digest(), digest):
        raise VerificationError(
            "ratls.tagged_evidence.claims.pubkey-hash",
            "does not hash the certificate's public key",
            expected=hasher(spki).hexdigest(),
            actual=digest.hex(),
        )
    _check_binding("ratls.tagged_evidence.report_data", quote, hashlib.sha256(claims_raw).digest())
    return quote


def extract_evidence(cert_bytes: bytes | x509.Certificate) -> RaTlsEvidence:
    """The quote in an RA-TLS certificate, after checking it binds the certificate's key."""
    cert = cert_bytes if isinstance(cert_bytes, x509.Certificate) else load_certificate(cert_bytes)
    try:
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except _CERT_ERRORS as exc:
        raise VerificationError(
            "ratls.certificate.public_key", f"does not parse ({type(exc).__name__}: {exc})"
        ) from None
    quotes: list[bytes] = []
    formats: list[str] = []
    tagged = _extension(cert, OID_TCG_DICE_TAGGED_EVIDENCE)
    if tagged is not None:
        quotes.append(_tagged(tagged, spki))
        formats.append("tcg-dice-tagged-evidence")
    legacy = _extension(cert, OID_GRAMINE_LEGACY_QUOTE)
    if legacy is not None:
        _check_binding("ratls.legacy_quote.report_data", legacy, hashlib.sha256(spki).digest())
        quotes.append(legacy)
        formats.append("gramine-legacy")
    if not quotes:
        raise VerificationError(
            "ratls.certificate",
            f"no evidence extension ({OID_TCG_DICE_TAGGED_EVIDENCE.dotted_string} "
            f"or {OID_GRAMINE_LEGACY_QUOTE.dotted_string})",
        )
    quote = quotes[0]
    kind = _quote_kind(quote)
    return RaTlsEvidence(
        evidence=Evidence(kind=kind, raw=quote, report_data=_report_data(quote)),
        public_key_spki=spki,
        formats=tuple(formats),
    )


def verify_certificate(cert_bytes: bytes, trust: Any, now: datetime | None = None) -> tuple[VerifiedReport, bytes]:
    """Extract, check the key binding, and verify the quote; return the report and the SPKI.

    The caller pins the returned public key for the TLS session and applies its policy to the
    report (`validate`), e.g. the measurement allow-list; report data is already checked here.
    """
    from veil.attest.verify import verify

    found = extract_evidence(cert_bytes)
    return verify(found.evidence, trust, now), found.public_key_spki
