"""Round trips and single-bit tampering for every Veil crypto format (hypothesis property tests)."""

from __future__ import annotations

import io
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.crypto import aead, chunked, hpke
from veil.crypto.at_rest import Sealer
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.envelope import (
    DEFAULT_LIFETIME_S,
    VERSION,
    Envelope,
    new_request_id,
    open_envelope,
    response_key,
    seal,
)
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
@given(
    st.binary(max_size=512),
    ident,
    ident,
    st.sampled_from(["request", "response"]),
    st.integers(min_value=1, max_value=(1 << 53) - 1),
)
def test_envelope_round_trip(plaintext: bytes, model: str, user: str, direction: str, expires: int) -> None:
    rid = new_request_id()
    env = seal(KEY, plaintext, model=model, user=user, request_id=rid, direction=direction, expires=expires)
    wire = Envelope.from_json(env.to_json())
    assert wire == env and wire.expires == expires and env.to_json()["v"] == VERSION == 2
    assert (
        open_envelope(KEY, wire, model=model, user=user, direction=direction, request_id=rid, expires=expires)
        == plaintext
    )


def test_envelope_default_window_and_aad_binds_expires() -> None:
    before = int(time.time())
    env = seal(KEY, b"x", model="m", user="u", request_id=new_request_id(), direction="request")
    assert before + DEFAULT_LIFETIME_S <= env.expires <= int(time.time()) + DEFAULT_LIFETIME_S
    assert env.aad() == canonical_json({k: v for k, v in env.to_json().items() if k != "ct"})
    assert b'"expires":' in env.aad() and b'"v":2' in env.aad()


@FAST
@given(st.integers(min_value=1, max_value=(1 << 53) - 1))
def test_envelope_with_changed_expires_fails_authentication(expires: int) -> None:
    """Nobody can stretch (or shorten) a window: `expires` is in the AAD."""
    env = seal(KEY, b"input", model="m", user="u", request_id=new_request_id(), direction="request", expires=1000)
    if expires == 1000:
        expires += 1
    stretched = Envelope.from_json({**env.to_json(), "expires": expires})
    with pytest.raises(IntegrityError):
        open_envelope(KEY, stretched, model="m", user="u", direction="request")


def test_answer_with_another_window_is_refused_by_name() -> None:
    rid = new_request_id()
    resp = seal(KEY, b"out", model="m", user="u", request_id=rid, direction="response", expires=1000)
    with pytest.raises(MalformedError) as exc:
        open_envelope(KEY, resp, model="m", user="u", direction="response", request_id=rid, expires=1001)
    assert exc.value.field == "expires"


def test_version_1_envelope_is_refused_naming_v() -> None:
    v1 = {"v": 1, "model": "m", "user": "u", "request_id": new_request_id(), "direction": "request", "ct": "AAAA"}
    with pytest.raises(MalformedError) as exc:
        Envelope.from_json(v1)
    assert exc.value.field == "v" and "version 1" in str(exc.value) and "2" in exc.value.reason


@FAST
@given(st.binary(max_size=128), st.integers(min_value=0))
def test_envelope_single_bit_flip_in_ct_fails(plaintext: bytes, bit: int) -> None:
    rid = new_request_id()
    env = seal(KEY, plaintext, model="m", user="u", request_id=rid, direction="request")
    bad = Envelope(env.model, env.user, env.request_id, env.direction, flip(env.ct, bit), expires=env.expires)
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
    forged = Envelope(values["model"], values["user"], values["request_id"], "request", env.ct, expires=env.expires)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, forged, model=values["model"], user=values["user"], direction="request")


def test_response_cannot_be_replayed_as_request_or_swapped() -> None:
    rid, other = new_request_id(), new_request_id()
    resp = seal(KEY, b"out", model="m", user="u", request_id=rid, direction="response")
    as_request = Envelope(resp.model, resp.user, resp.request_id, "request", resp.ct, expires=resp.expires)
    with pytest.raises(IntegrityError):
        open_envelope(KEY, as_request, model="m", user="u", direction="request")
    swapped = Envelope(resp.model, resp.user, other, "response", resp.ct, expires=resp.expires)
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
        ({"v": 1}, "v"),
        ({"v": 3}, "v"),
        ({"v": True}, "v"),
        ({"expires": "soon"}, "expires"),
        ({"expires": 1.5e9}, "expires"),
        ({"expires": True}, "expires"),
        ({"expires": 0}, "expires"),
        ({"expires": 1 << 53}, "expires"),
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


def test_envelope_without_expires_is_refused() -> None:
    env = seal(KEY, b"x", model="m", user="u", request_id=new_request_id(), direction="request").to_json()
    del env["expires"]
    with pytest.raises(MalformedError, match="expires"):
        Envelope.from_json(env)


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
    digest = chunked.content_digest(KEY, plaintext)
    chunked.seal_stream(KEY, io.BytesIO(plaintext), out, model="m", version=3, digest=digest, chunk_size=chunk_size)
    opened = chunked.open_stream(KEY, io.BytesIO(out.getvalue()), model="m", version=3, digest=digest)
    assert b"".join(opened) == plaintext


def test_chunked_refuses_another_version_or_digest_even_under_the_same_key() -> None:
    old = chunked.seal_bytes(KEY, b"old model", model="m", version=1)
    new_digest = chunked.content_digest(KEY, b"new model")
    with pytest.raises(MalformedError) as exc:  # rollback: yesterday's file, same key
        chunked.open_bytes(KEY, old, model="m", version=2, digest=new_digest)
    assert exc.value.field == "version"
    with pytest.raises(MalformedError) as exc:  # substitution: same version number, other content
        chunked.open_bytes(KEY, old, model="m", version=1, digest=new_digest)
    assert exc.value.field == "digest"
    assert chunked.open_bytes(KEY, old, model="m", version=1, digest=chunked.content_digest(KEY, b"old model")) == (
        b"old model"
    )


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
    header = b'{"chunk_size":1099511627776,"digest":"' + b"0" * 64 + b'","file_id":"00","model":"m","v":2,"version":1}'
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
