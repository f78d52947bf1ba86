"""Keys never print themselves; request signatures bind method, path, body, time and nonce."""

from __future__ import annotations

import logging
import pickle
import traceback

import pytest

from veil.crypto import hpke
from veil.crypto.at_rest import Sealer
from veil.crypto.encoding import b64e
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.identity import Identity, SignedHeaders, principal_id, signing_payload, verify_signature
from veil.crypto.keys import SymmetricKey


def _forms(raw: bytes) -> list[str]:
    """Every printable form a leaked key might take."""
    return [raw.hex(), b64e(raw), repr(raw)[2:-1], raw.hex().upper()]


def test_secrets_never_print(caplog: pytest.LogCaptureFixture) -> None:
    sym = SymmetricKey.generate()
    pair = hpke.HpkeKeyPair.generate()
    ident = Identity.generate()
    sealer = Sealer(sym)
    secrets = [sym.material(), pair.private_bytes(), ident.to_private_bytes()]
    caplog.set_level(logging.DEBUG)
    logging.getLogger("veil.test").info("objects %s %r %s", sym, pair, [ident, sealer])
    try:
        raise RuntimeError(f"failed with {sym!r} {pair!r} {ident!r}")
    except RuntimeError:
        tb = traceback.format_exc()
    printed = " ".join([repr(sym), str(sym), repr(pair), str(pair), repr(ident), str(ident), repr(sealer), f"{sym}"])
    printed += caplog.text + tb
    for secret in secrets:
        for form in _forms(secret):
            assert form not in printed
    assert "<secret>" in repr(sym)
    with pytest.raises(TypeError):
        pickle.dumps(sym)


def test_symmetric_key_checks_length_and_compares_in_constant_time() -> None:
    with pytest.raises(MalformedError):
        SymmetricKey(b"short")
    assert SymmetricKey(b"\1" * 32) == SymmetricKey(b"\1" * 32)
    assert SymmetricKey(b"\1" * 32) != SymmetricKey(b"\2" * 32)


def test_principal_id_is_sha256_of_public_key() -> None:
    ident = Identity.from_private_bytes(bytes(32))
    import hashlib

    assert ident.id == hashlib.sha256(ident.public_key).hexdigest() == principal_id(ident.public_key)
    assert Identity.from_private_bytes(ident.to_private_bytes()).id == ident.id
    with pytest.raises(MalformedError):
        Identity.from_private_bytes(b"\0" * 31)


@pytest.mark.parametrize(
    "change",
    [
        {"method": "GET"},
        {"path": "/v1/models/n/key"},
        {"body": b'{"v":1,"x":2}'},
        {"timestamp": 1_700_000_001},
        {"nonce": "00" * 16},
        {"seq": 8},
    ],
)
def test_signature_covers_every_part(change: dict) -> None:
    ident = Identity.generate()
    parts = {"method": "PUT", "path": "/v1/models/m/key", "body": b'{"v":1}', "timestamp": 1_700_000_000}
    signed = ident.sign_request(**parts, nonce="ab" * 16, seq=7)
    good = signing_payload(parts["method"], parts["path"], parts["body"], parts["timestamp"], "ab" * 16, 7)
    verify_signature(ident.public_key, good, signed.signature)
    moved = {**parts, "nonce": "ab" * 16, "seq": 7, **change}
    with pytest.raises(IntegrityError):
        verify_signature(
            ident.public_key,
            signing_payload(
                moved["method"], moved["path"], moved["body"], moved["timestamp"], moved["nonce"], moved["seq"]
            ),
            signed.signature,
        )


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("x-veil-timestamp", "1_700_000_000", "x-veil-timestamp"),
        ("x-veil-timestamp", "soon", "x-veil-timestamp"),
        ("x-veil-nonce", "XYZ", "x-veil-nonce"),
        ("x-veil-nonce", "ab", "x-veil-nonce"),
        ("x-veil-signature", "!!", "x-veil-signature"),
        ("x-veil-principal", "", "headers"),
    ],
)
def test_signed_headers_parse_errors_name_the_header(header: str, value: str, field: str) -> None:
    headers = Identity.generate().sign_request("GET", "/", b"").as_dict()
    headers[header] = value
    with pytest.raises(MalformedError) as exc:
        SignedHeaders.from_headers(headers)
    assert exc.value.field == field
