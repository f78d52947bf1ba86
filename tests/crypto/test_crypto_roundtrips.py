"""Round trips and single-bit tampering for every Veil crypto format (hypothesis property tests)."""

from __future__ import annotations

import io
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.crypto import aead, chunked, hpke
from veil.crypto.at_rest import Sealer
from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import Envelope, new_request_id, open_envelope, response_key, seal
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = SymmetricKey(bytes(range(32)))
OTHER = SymmetricKey(bytes(range(1, 33)))
ident = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")


def flip(data: bytes, bit: int) -> bytes:
    """Flip one bit (index taken modulo the length) of `data`."""
    bit %= len(data) * 8
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- encodings ------------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=200))
def test_b64url_round_trip_and_canonical(data: bytes) -> None:
    text = b64e(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64d(text) == data


@pytest.mark.parametrize("bad", ["AAAA!", "AB", "A", "AA AA", "AA+A", "AA/A", "AAAA\n", "=AAA"])
def test_b64url_rejects_foreign_and_non_canonical(bad: str) -> None:
    with pytest.raises(MalformedError) as exc:
        b64d(bad, "ct")
    assert exc.value.field == "ct"


# -- envelopes ------------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=512), ident, ident, st.sampled_from(["request", "response"]))
def test_envelope_round_trip(plaintext: bytes, model: str, user: str, direction: str) -> None:
    rid = new_request_id()
    env = seal(KEY, plaintext, model=model, user=user, request_id=rid, direction=direction)
    wire = Envelope.from_json(env.to_json())
    assert wire == env
    assert open_envelope(KEY, wire, model=model, user=user, direction=direction, request_id=rid) == plaintext


@FAST
@given(st.binary(max_size=128), st.integers(min_value=0))
def test_envelope_single_bit_flip_in_ct_fails(plaintext: bytes, bit: int) -> None:
    rid = new_request_id()
    env = seal(KEY, plaintext, model="m", user="u", request_id=rid, direction="request")
    bad = Envelope(env.model, env.user, env.request_id, env.direction, flip(env.ct, bit))
    with pytest.raises(IntegrityError):
        open_envelope(KEY, bad, model="m", user="u", direction="request")


@FAST
@given(st.sampled_from(["model", "user", "request_id"]), st.integers(min_value=0))
def test_envelope_forged_header_fails_authentication(field: str, bit: int) -> None:
    """Change a header field but make the caller expect it: the AAD still catches it."""
    rid = new_request_id()
    env = seal(KEY, b"input", model="m", user="u", request_id=rid, direction="request")
    values = {"model": "m", "user": "u", "request_id": rid}
    values[field] = {"model": "m2", "user": "u2", "request_id": new_request_id()}[field]
    forged = Envelope(values["model"], values["user"], values["request_id"], "request", env.ct)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, forged, model=values["model"], user=values["user"], direction="request")


def test_response_cannot_be_replayed_as_request_or_swapped() -> None:
    rid, other = new_request_id(), new_request_id()
    resp = seal(KEY, b"out", model="m", user="u", request_id=rid, direction="response")
    as_request = Envelope(resp.model, resp.user, resp.request_id, "request", resp.ct)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, as_request, model="m", user="u", direction="request")
    swapped = Envelope(resp.model, resp.user, other, "response", resp.ct)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, swapped, model="m", user="u", direction="response")
    assert response_key(KEY, rid) != KEY and response_key(KEY, rid) != response_key(KEY, other)
    with pytest.raises(IntegrityError):
        open_envelope(OTHER, resp, model="m", user="u", direction="response")


def test_envelope_nonces_are_fresh() -> None:
    rid = new_request_id()
    a = seal(KEY, b"same", model="m", user="u", request_id=rid, direction="request")
    b = seal(KEY, b"same", model="m", user="u", request_id=rid, direction="request")
    assert a.ct[: aead.NONCE_BYTES] != b.ct[: aead.NONCE_BYTES]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": 2}, "v"),
        ({"v": True}, "v"),
        ({"direction": "sideways"}, "direction"),
        ({"request_id": "XYZ"}, "request_id"),
        ({"model": "../etc"}, "model"),
        ({"user": ""}, "user"),
        ({"ct": "not base64!"}, "ct"),
        ({"extra": 1}, "envelope"),
    ],
)
def test_envelope_parse_errors_name_the_field(change: dict, field: str) -> None:
    env = seal(KEY, b"x", model="m", user="u", request_id=new_request_id(), direction="request").to_json()
    with pytest.raises(MalformedError) as exc:
        Envelope.from_json({**env, **change})
    assert exc.value.field == field


# -- chunked model files --------------------------------------------------------------------------
def _records(sealed: bytes) -> tuple[bytes, list[bytes]]:
    """Split a sealed model into its prefix (magic + header) and its length-prefixed records."""
    (hlen,) = struct.unpack(">I", sealed[8:12])
    prefix, rest, records = sealed[: 12 + hlen], sealed[12 + hlen :], []
    while rest:
        (n,) = struct.unpack(">I", rest[:4])
        records.append(rest[: 4 + n])
        rest = rest[4 + n :]
    return prefix, records


@FAST
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_chunked_round_trip(plaintext: bytes, chunk_size: int) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=chunk_size)
    assert chunked.open_bytes(KEY, sealed, model="m") == plaintext
    out = io.BytesIO()
    chunked.seal_stream(KEY, io.BytesIO(plaintext), out, model="m", chunk_size=chunk_size)
    assert b"".join(chunked.open_stream(KEY, io.BytesIO(out.getvalue()), model="m")) == plaintext


@FAST
@given(st.binary(min_size=1, max_size=100), st.integers(min_value=0))
def test_chunked_single_bit_flip_fails(plaintext: bytes, bit: int) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=16)
    with pytest.raises((IntegrityError, MalformedError)):
        chunked.open_bytes(KEY, flip(sealed, bit), model="m")


@FAST
@given(st.binary(min_size=33, max_size=120), st.data())
def test_chunked_reorder_drop_duplicate_truncate_extend(plaintext: bytes, data: st.DataObject) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=16)
    prefix, recs = _records(sealed)
    assert len(recs) >= 3
    i = data.draw(st.integers(0, len(recs) - 2))
    swapped = recs[:i] + [recs[i + 1], recs[i]] + recs[i + 2 :]
    dropped = recs[:i] + recs[i + 1 :]
    duplicated = recs[: i + 1] + [recs[i]] + recs[i + 1 :]
    truncated = recs[: i + 1]
    extended = recs + [recs[-1]]
    cut = data.draw(st.integers(1, len(sealed) - 1))
    for variant in (swapped, dropped, duplicated, truncated, extended):
        with pytest.raises(IntegrityError):
            chunked.open_bytes(KEY, prefix + b"".join(variant), model="m")
    with pytest.raises((IntegrityError, MalformedError)):
        chunked.open_bytes(KEY, sealed[:cut], model="m")
    with pytest.raises(IntegrityError):
        chunked.open_bytes(KEY, sealed + b"\x00", model="m")


def test_chunks_cannot_move_between_files_or_models() -> None:
    a = chunked.seal_bytes(KEY, b"a" * 40, model="m", chunk_size=16)
    b = chunked.seal_bytes(KEY, b"b" * 40, model="m", chunk_size=16)
    pa, ra = _records(a)
    _, rb = _records(b)
    with pytest.raises(IntegrityError):
        chunked.open_bytes(KEY, pa + ra[0] + rb[1] + ra[2], model="m")
    with pytest.raises(MalformedError) as exc:
        chunked.open_bytes(KEY, a, model="other")
    assert exc.value.field == "model"
    with pytest.raises(IntegrityError):
        chunked.open_bytes(OTHER, a, model="m")


def test_chunked_header_refuses_foreign_and_oversized() -> None:
    with pytest.raises(MalformedError, match="bad magic"):
        chunked.open_bytes(KEY, b"NOTVEIL!" + b"\0" * 20, model="m")
    header = b'{"chunk_size":1099511627776,"file_id":"00","model":"m","v":1}'
    with pytest.raises(MalformedError, match="chunk_size"):
        chunked.open_bytes(KEY, chunked.MAGIC + struct.pack(">I", len(header)) + header, model="m")
    with pytest.raises(MalformedError):
        chunked.seal_bytes(KEY, b"x", model="m", chunk_size=0)


# -- HPKE and at-rest sealing --------------------------------------------------------------------
RECIPIENT = hpke.HpkeKeyPair.from_private_bytes(bytes(range(32)))


@FAST
@given(st.binary(max_size=100), st.binary(max_size=40), st.binary(min_size=1, max_size=20))
def test_hpke_round_trip_and_label_binding(plaintext: bytes, aad: bytes, info: bytes) -> None:
    sealed = hpke.seal(RECIPIENT.public_key, plaintext, info=info, aad=aad)
    assert len(sealed) == hpke.ENC_BYTES + len(plaintext) + 16
    assert RECIPIENT.open(sealed, info=info, aad=aad) == plaintext
    with pytest.raises(IntegrityError):
        RECIPIENT.open(sealed, info=info + b"x", aad=aad)
    with pytest.raises(IntegrityError):
        RECIPIENT.open(sealed, info=info, aad=aad + b"x")
    with pytest.raises(IntegrityError):
        hpke.HpkeKeyPair.generate().open(sealed, info=info, aad=aad)


@FAST
@given(st.binary(max_size=64), st.integers(min_value=0))
def test_hpke_single_bit_flip_fails(plaintext: bytes, bit: int) -> None:
    sealed = hpke.seal(RECIPIENT.public_key, plaintext, info=b"i", aad=b"a")
    with pytest.raises(IntegrityError):
        RECIPIENT.open(flip(sealed, bit), info=b"i", aad=b"a")


def test_hpke_rejects_bad_public_key() -> None:
    with pytest.raises(MalformedError) as exc:
        hpke.seal(b"\x01" * 31, b"x", info=b"i")
    assert exc.value.field == "public_key"
    with pytest.raises(MalformedError):
        RECIPIENT.open(b"short", info=b"i")


SEALER = Sealer(KEY)


@FAST
@given(st.binary(max_size=100), st.text(min_size=1, max_size=40), st.integers(min_value=0))
def test_at_rest_round_trip_flip_and_row_binding(plaintext: bytes, record: str, bit: int) -> None:
    sealed = SEALER.seal(record, plaintext)
    assert SEALER.open(record, sealed) == plaintext
    with pytest.raises(IntegrityError):
        SEALER.open(record, flip(sealed, bit))
    with pytest.raises(IntegrityError):
        SEALER.open(record + "x", sealed)
    with pytest.raises(IntegrityError):
        Sealer(OTHER).open(record, sealed)


def test_aead_short_input_is_malformed() -> None:
    with pytest.raises(MalformedError):
        aead.decrypt(KEY, os.urandom(27), b"")


@FAST
@given(st.binary(max_size=64), st.binary(max_size=32), st.binary(max_size=32), st.binary(min_size=32, max_size=32))
def test_native_hpke_matches_pyhpke_reference(plaintext: bytes, info: bytes, aad: bytes, eph: bytes) -> None:
    """Our RFC 9180 implementation gives byte-identical output to pyhpke with the same ephemeral key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from pyhpke import KEMKey, KEMKeyPair

    sk = X25519PrivateKey.from_private_bytes(eph)
    ours = hpke._seal_with(sk, RECIPIENT.public_key, plaintext, info=info, aad=aad)
    eks = KEMKeyPair(KEMKey.from_pyca_cryptography_key(sk), KEMKey.from_pyca_cryptography_key(sk.public_key()))
    enc, ctx = hpke.SUITE.create_sender_context(
        hpke.SUITE.kem.deserialize_public_key(RECIPIENT.public_key), info=info, eks=eks
    )
    assert ours == enc + ctx.seal(plaintext, aad=aad)
    recipient = hpke.SUITE.create_recipient_context(
        ours[:32], KEMKey.from_pyca_cryptography_key(X25519PrivateKey.from_private_bytes(bytes(range(32)))), info=info
    )
    assert recipient.open(ours[32:], aad=aad) == plaintext
