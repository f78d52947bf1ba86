"""A test DCAP PKI: the real SGX/TDX vectors re-signed under a test root, so that a quote whose
body we change (e.g. the debug bit) still verifies end to end in dcap-qvl and in Veil.

Everything Intel's PKI signs is re-signed with test keys under the same names: a root CA, the
PCK CA that issued the real leaf, a PCK leaf carrying the real leaf's SGX extension (so FMSPC,
CPUSVN and PCESVN still match the real TCB info), the TCB signing certificate, both CRLs, the
TCB info and QE identity (their real JSON, signed anew). In the quote, a new attestation key
signs header and body, the QE report (real, with report data rebound to the new key) is signed
by the new PCK key, and the certification data carries the new PCK chain. Verify with
`TrustConfig(options={"intel_root_ca_sha256": pki.root_sha256})`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta

from attest_helpers import SGX_TIME, TDX_TIME, load_vector
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from veil.attest import dcap
from veil.attest.evidence import Evidence

_SGX_EXT = x509.ObjectIdentifier("1.2.840.113741.1.13.1")


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = utils.decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)[1:]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _real(der: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(der)


@dataclass
class DcapTestPki:
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    pck_ca: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_leaf: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    tcb_signer: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    collateral: bytes
    now: datetime
    template: bytes  # the real quote the test quotes are derived from

    @property
    def root_sha256(self) -> str:
        return hashlib.sha256(self.root.public_bytes(serialization.Encoding.DER)).hexdigest()

    def chain_pem(self) -> bytes:
        return _pem(self.pck_leaf) + _pem(self.pck_ca) + _pem(self.root) + b"\0"

    def quote(self, body: bytes | None = None) -> bytes:
        """The template quote, optionally with another body, fully re-signed under this PKI."""
        q = dcap.parse_quote(self.template)
        start, end = q.regions["body"]
        signed = self.template[:start] + (q.body if body is None else body) + self.template[end:]
        signed = signed[: q.regions["signed"][1]]
        attestation_key = ec.generate_private_key(ec.SECP256R1())
        ak = _raw_pub(attestation_key)
        auth = q.part("qe_auth_data")
        qe_report = bytearray(q.part("qe_report"))
        qe_report[320:384] = hashlib.sha256(ak + auth).digest() + bytes(32)
        pem = self.chain_pem()
        qe_part = (
            bytes(qe_report)
            + _raw_sig(self.pck_key, bytes(qe_report))
            + struct.pack("<H", len(auth))
            + auth
            + struct.pack("<HI", dcap.CERT_TYPE_PCK_CHAIN, len(pem))
            + pem
        )
        if q.version != 3:
            qe_part = struct.pack("<HI", dcap.CERT_TYPE_QE_REPORT, len(qe_part)) + qe_part
        sig_data = _raw_sig(attestation_key, signed) + ak + qe_part
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def evidence(self, kind: str, body: bytes | None = None) -> Evidence:
        return Evidence(kind=kind, raw=self.quote(body), report_data=b"", collateral=self.collateral)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now + timedelta(days=365))
    )


def _ku(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=sign and not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: datetime) -> str:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - timedelta(days=1))
        .next_update(now + timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER).hex()


def make_pki(which: str) -> DcapTestPki:
    """A test PKI shaped like Intel's around the real `sgx` or `tdx` vector."""
    if which == "sgx":
        template, real_col, now = load_vector("sgx/sgx_quote"), load_vector("sgx/sgx_quote_collateral.json"), SGX_TIME
    else:
        template, real_col, now = load_vector("tdx/tdx_quote"), load_vector("tdx/tdx_quote_collateral.json"), TDX_TIME
    real_leaf, real_ca, real_root = (_real(d) for d in dcap.parse_quote(template).pck_chain())
    fields = json.loads(real_col)
    real_tcb_signer = _real(dcap.pem_chain(fields["tcb_info_issuer_chain"].encode(), "x")[0])

    root_key, ca_key, pck_key, tcb_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = (
        _builder(real_root.subject, real_root.subject, root_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ku(sign=False, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pck_ca = (
        _builder(real_ca.subject, root.subject, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ku(sign=False, ca=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    sgx_ext = real_leaf.extensions.get_extension_for_oid(_SGX_EXT).value
    pck_leaf = (
        _builder(real_leaf.subject, pck_ca.subject, pck_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ku(sign=True, ca=False), critical=True)
        .add_extension(sgx_ext, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tcb_signer = (
        _builder(real_tcb_signer.subject, root.subject, tcb_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ku(sign=True, ca=False), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    tcb_chain = (_pem(tcb_signer) + _pem(root)).decode()
    collateral = {
        "pck_crl_issuer_chain": (_pem(pck_ca) + _pem(root)).decode(),
        "root_ca_crl": _crl(root, root_key, now),
        "pck_crl": _crl(pck_ca, ca_key, now),
        "tcb_info_issuer_chain": tcb_chain,
        "tcb_info": fields["tcb_info"],
        "tcb_info_signature": _raw_sig(tcb_key, fields["tcb_info"].encode()).hex(),
        "qe_identity_issuer_chain": tcb_chain,
        "qe_identity": fields["qe_identity"],
        "qe_identity_signature": _raw_sig(tcb_key, fields["qe_identity"].encode()).hex(),
    }
    return DcapTestPki(
        root=root,
        root_key=root_key,
        pck_ca=pck_ca,
        pck_ca_key=ca_key,
        pck_leaf=pck_leaf,
        pck_key=pck_key,
        tcb_signer=tcb_signer,
        tcb_key=tcb_key,
        collateral=json.dumps(collateral).encode(),
        now=now,
        template=template,
    )
