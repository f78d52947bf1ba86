"""Every certificate load path is total: a certificate whose X.509 version byte is invalid makes
cryptography raise `InvalidVersion` (not a ValueError); it must surface as a VerificationError
naming the certificate. The failing inputs are the real vectors with that one byte changed
(found by the bit-flip properties in test_snp.py / test_dcap.py, about 1 run in 15)."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from attest_helpers import SGX_TIME, SNP_TIME, VECTORS, cert_table, load_vector
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from veil.attest import dcap, ratls, snp
from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify
from veil.cli.attest import attest

# DER: Certificate SEQUENCE (4 bytes), TBSCertificate SEQUENCE (4), [0] { INTEGER version }
_VERSION_PREFIX = bytes.fromhex("a003020102")


def bad_version(der: bytes) -> bytes:
    """`der` with the version INTEGER's one byte flipped from 2 (v3) to 3: an invalid version."""
    assert der[8:13] == _VERSION_PREFIX, der[:16].hex()
    out = der[:12] + b"\x03" + der[13:]
    with pytest.raises(x509.InvalidVersion):  # the input really is the failing case
        x509.load_der_x509_certificate(out)
    assert not issubclass(x509.InvalidVersion, ValueError)
    return out


_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\n([A-Za-z0-9+/=\n]+?)-----END CERTIFICATE-----")


def patch_pem(pem: bytes, index: int, new_der: bytes) -> bytes:
    """Replace certificate `index` of a PEM chain by `new_der` (same length), keeping line breaks."""
    match = list(_PEM.finditer(pem))[index]
    lines = match.group(1).split(b"\n")
    text = base64.b64encode(new_der)
    assert len(text) == sum(len(line) for line in lines)
    out, pos = [], 0
    for line in lines:
        out.append(text[pos : pos + len(line)])
        pos += len(line)
    return pem[: match.start(1)] + b"\n".join(out) + pem[match.end(1) :]


def _header_len(der: bytes, pos: int) -> int:
    """Length of the tag and length octets of the DER element at `pos`."""
    first = der[pos + 1]
    return 2 + (first & 0x7F if first & 0x80 else 0)


def _element_end(der: bytes, pos: int) -> int:
    header = _header_len(der, pos)
    length = der[pos + 1] if header == 2 else int.from_bytes(der[pos + 2 : pos + header], "big")
    return pos + header + length


def _milan() -> tuple[bytes, bytes, bytes, bytes]:
    chain = load_vector("snp/ask_ark_milan.pem")
    ask, ark = (c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(chain))
    return load_vector("snp/attestation.bin"), load_vector("snp/vcek.der"), ask, ark


# --- SEV-SNP ------------------------------------------------------------------------------------


def test_snp_load_cert_names_the_field() -> None:
    _, vcek, _, _ = _milan()
    with pytest.raises(VerificationError) as info:
        snp._load_cert(bad_version(vcek), "vcek")
    assert info.value.field == "vcek"
    assert "InvalidVersion" in info.value.reason


@pytest.mark.parametrize(
    ("which", "field"), [(0, "snp.certs[0] (vcek)"), (1, "snp.certs[1] (ask)"), (2, "snp.certs[2] (ark)")]
)
def test_snp_der_certs_with_bad_version_are_named(which: int, field: str) -> None:
    raw, *ders = _milan()
    ders[which] = bad_version(ders[which])
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b""), TrustConfig(options={"snp_certs": ders}), SNP_TIME)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize(("which", "field"), [(0, "snp.certs[1] (ask)"), (1, "snp.certs[2] (ark)")])
def test_snp_pem_bundle_with_bad_version_names_the_certificate(which: int, field: str) -> None:
    raw, vcek, _, _ = _milan()
    pem = load_vector("snp/ask_ark_milan.pem")
    der = x509.load_pem_x509_certificates(pem)[which].public_bytes(serialization.Encoding.DER)
    bad_pem = patch_pem(pem, which, bad_version(der))
    with pytest.raises(VerificationError) as info:
        verify(
            Evidence(kind="sev-snp", raw=raw, report_data=b""),
            TrustConfig(options={"snp_certs": [vcek, bad_pem]}),
            SNP_TIME,
        )
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize(("role", "guid"), [("vcek", snp.GUID_VCEK), ("ask", snp.GUID_ASK), ("ark", snp.GUID_ARK)])
def test_snp_cert_table_entry_with_bad_version_is_named_by_role(role: str, guid) -> None:
    raw, vcek, ask, ark = _milan()
    certs = {"vcek": vcek, "ask": ask, "ark": ark}
    certs[role] = bad_version(certs[role])
    table = cert_table(
        [(str(snp.GUID_VCEK), certs["vcek"]), (str(snp.GUID_ASK), certs["ask"]), (str(snp.GUID_ARK), certs["ark"])]
    )
    with pytest.raises(VerificationError) as info:
        verify(Evidence(kind="sev-snp", raw=raw, report_data=b"", collateral=table), TrustConfig(), SNP_TIME)
    assert info.value.field == f"snp.{role}", str(info.value)


# --- DCAP: the PCK chain in the quote, and the collateral's issuer chains -----------------------


def _sgx() -> Evidence:
    return Evidence(
        kind="sgx-dcap",
        raw=load_vector("sgx/sgx_quote"),
        report_data=b"",
        collateral=load_vector("sgx/sgx_quote_collateral.json"),
    )


@pytest.mark.parametrize("index", [0, 1])
def test_pck_chain_cert_with_bad_version_is_named(index: int) -> None:
    evidence = _sgx()
    quote = dcap.parse_quote(evidence.raw)
    start, end = quote.regions["pck_chain"]
    pem = patch_pem(quote.pck_chain_pem, index, bad_version(quote.pck_chain()[index]))
    tampered = replace(evidence, raw=evidence.raw[:start] + pem + evidence.raw[end:])
    with pytest.raises(VerificationError) as info:
        verify(tampered, TrustConfig(), SGX_TIME)
    assert info.value.field == f"quote.pck_chain[{index}]", str(info.value)
    if index == 0:  # the PCCS source reads the FMSPC and CA from the leaf before verification
        for reader in (dcap.parse_quote(tampered.raw).fmspc, dcap.parse_quote(tampered.raw).pck_ca):
            with pytest.raises(VerificationError) as info:
                reader()
            assert info.value.field == "quote.pck_chain[0]"


@pytest.mark.parametrize("name", ["pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"])
def test_collateral_chain_cert_with_bad_version_is_named(name: str) -> None:
    evidence = _sgx()
    fields = json.loads(evidence.collateral)
    pem = fields[name].encode()
    fields[name] = patch_pem(pem, 0, bad_version(dcap.pem_chain(pem, name)[0])).decode()
    tampered = replace(evidence, collateral=json.dumps(fields).encode())
    with pytest.raises(VerificationError) as info:
        verify(tampered, TrustConfig(), SGX_TIME)
    assert info.value.field == f"collateral.{name}[0]", str(info.value)


@pytest.mark.parametrize("name", ["pck_crl", "root_ca_crl"])
def test_crl_with_bad_version_is_named(name: str) -> None:
    evidence = _sgx()
    fields = json.loads(evidence.collateral)
    crl = bytes.fromhex(fields[name])
    pos = _header_len(crl, 0)
    pos += _header_len(crl, pos)  # now at TBSCertList's first element: INTEGER version v2 (1)
    assert crl[pos : pos + 3] == bytes.fromhex("020101")
    fields[name] = (crl[: pos + 2] + b"\x03" + crl[pos + 3 :]).hex()
    with pytest.raises(x509.InvalidVersion):
        x509.load_der_x509_crl(bytes.fromhex(fields[name]))
    with pytest.raises(VerificationError) as info:
        verify(replace(evidence, collateral=json.dumps(fields).encode()), TrustConfig(), SGX_TIME)
    assert info.value.field.startswith(f"collateral.{name}"), str(info.value)


# --- RA-TLS and the CLI ----------------------------------------------------------------------------


def test_ratls_certificate_with_bad_version_is_named() -> None:
    _, vcek, _, _ = _milan()
    bad = bad_version(vcek)
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    for data in (bad, pem):
        with pytest.raises(VerificationError) as info:
            ratls.extract_evidence(data)
        assert info.value.field == "ratls.certificate"


def _cli(*args: str):
    result = CliRunner().invoke(attest, list(args))
    # no traceback: the command exits by itself (SystemExit), never by an uncaught exception
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_names_bad_certificates_without_traceback(tmp_path: Path) -> None:
    _, vcek, _, _ = _milan()
    bad_vcek = tmp_path / "vcek.der"
    bad_vcek.write_bytes(bad_version(vcek))
    result = _cli(
        "verify",
        str(VECTORS / "snp/attestation.bin"),
        "--collateral",
        str(bad_vcek),
        "--collateral",
        str(VECTORS / "snp/ask_ark_milan.pem"),
        "--at",
        "2025-06-19T12:00:00Z",
        "--json",
    )
    verdict = json.loads(result.output)
    assert result.exit_code == 1 and verdict["stage"] == "verify"
    assert verdict["error"]["field"] == "snp.certs[0] (vcek)"
    # a DER file is taken as an RA-TLS certificate: a corrupt one is named, not a traceback
    result = _cli("verify", str(bad_vcek), "--json")
    verdict = json.loads(result.output)
    assert result.exit_code == 1 and verdict["error"]["field"] == "ratls.certificate"
    result = _cli("verify", str(bad_vcek))
    assert result.exit_code == 1 and "ratls.certificate" in result.output


def test_snp_certificate_signature_unused_bits_byte_is_not_ignored() -> None:
    """Found by flipping every bit of every certificate: the ASK with its signature BIT STRING's
    unused-bits octet changed from 0 to 1 (outside the signed TBSCertificate; cryptography ignores
    it) was accepted. A changed byte anywhere in a certificate must fail, naming it."""
    raw, vcek, ask, ark = _milan()
    tbs = _header_len(ask, 0)
    pos = _element_end(ask, _element_end(ask, tbs))  # after TBSCertificate and signatureAlgorithm
    assert ask[pos] == 0x03 and ask[pos + _header_len(ask, pos)] == 0  # BIT STRING, 0 unused bits
    unused = pos + _header_len(ask, pos)
    tampered = ask[:unused] + b"\x01" + ask[unused + 1 :]
    x509.load_der_x509_certificate(tampered).verify_directly_issued_by(x509.load_der_x509_certificate(ark))
    with pytest.raises(VerificationError) as info:
        verify(
            Evidence(kind="sev-snp", raw=raw, report_data=b""),
            TrustConfig(options={"snp_certs": [vcek, tampered, ark]}),
            SNP_TIME,
        )
    assert info.value.field == "snp.certs[1] (ask).signature", str(info.value)
