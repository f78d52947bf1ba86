"""The binary envelope form (docs/protocol.md "Binary envelopes"): round trips, every framing
fault refused naming its field, and the JSON form's security properties holding on it too."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.crypto.encoding import canonical_json
from veil.crypto.envelope import (
    BINARY_CONTENT_TYPE,
    Envelope,
    is_binary,
    new_request_id,
    open_envelope,
    seal,
)
from veil.crypto.errors import CryptoError, IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = SymmetricKey(bytes(range(32)))
ident = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")


def sealed(plaintext: bytes = b"input", **kw: object) -> Envelope:
    args = {"model": "m", "user": "u", "request_id": new_request_id(), "direction": "request", **kw}
    return seal(KEY, plaintext, **args)  # type: ignore[arg-type]


def frame(header: bytes, ct: bytes, *, header_len: int | None = None, ct_len: int | None = None) -> bytes:
    """A binary envelope built by hand, lengths overridable."""
    hl = len(header) if header_len is None else header_len
    cl = len(ct) if ct_len is None else ct_len
    return b"VEN2" + struct.pack(">HI", hl, cl) + header + ct


def refused(data: bytes) -> MalformedError:
    with pytest.raises(MalformedError) as exc:
        Envelope.from_binary(data)
    return exc.value


@FAST
@given(st.binary(max_size=512), ident, ident, st.sampled_from(["request", "response"]))
def test_binary_round_trip_equals_the_json_form(plaintext: bytes, model: str, user: str, direction: str) -> None:
    rid = new_request_id()
    env = seal(KEY, plaintext, model=model, user=user, request_id=rid, direction=direction, expires=1000)
    data = env.to_binary()
    parsed = Envelope.from_binary(data)
    assert parsed == env == Envelope.from_json(env.to_json())
    assert Envelope.from_json(parsed.to_json()) == env  # binary -> JSON (the gateway's fallback)
    assert data[10 : 10 + len(env.aad())] == env.aad()  # the header is the AAD
    got = open_envelope(KEY, parsed, model=model, user=user, direction=direction, request_id=rid, expires=1000)
    assert got == plaintext


def test_ct_is_read_in_place() -> None:
    data = sealed(b"x" * 100_000).to_binary()
    parsed = Envelope.from_binary(data)
    assert isinstance(parsed.ct, memoryview) and parsed.ct.obj is data and len(parsed.ct) == 100_000 + 28
    assert Envelope.from_binary(bytearray(data)) == parsed and Envelope.from_binary(memoryview(data)) == parsed


def test_content_type() -> None:
    assert is_binary(BINARY_CONTENT_TYPE) and is_binary("Application/Vnd.Veil.Envelope; charset=binary")
    assert not is_binary("application/json") and not is_binary(None) and not is_binary("")


def test_truncated_prefix_and_header() -> None:
    env = sealed()
    data = env.to_binary()
    assert refused(b"").field == "envelope"
    assert refused(data[:9]).field == "envelope"
    assert "prefix" in refused(data[:9]).reason
    err = refused(data[: 10 + len(env.aad()) - 1])
    assert err.field == "header" and "truncated" in err.reason


@pytest.mark.parametrize("cut", [1, 16, 28])
def test_truncated_ct(cut: int) -> None:
    err = refused(sealed().to_binary()[:-cut])
    assert err.field == "ct" and "truncated" in err.reason


@pytest.mark.parametrize("extra", [b"\x00", b"trailing", b"VEN2"])
def test_trailing_bytes(extra: bytes) -> None:
    err = refused(sealed().to_binary() + extra)
    assert err.field == "envelope" and f"{len(extra)} trailing" in err.reason


def test_wrong_lengths() -> None:
    env = sealed()
    header, ct = env.aad(), bytes(env.ct)
    assert refused(frame(header, ct, header_len=0)).field == "header_length"
    assert refused(frame(header, ct, header_len=1025)).field == "header_length"
    assert refused(frame(header, ct, ct_len=27)).field == "ct_length"
    # a header length one short or long shifts the header's end: not JSON, or truncated / trailing
    for delta in (-1, 1):
        err = refused(frame(header, ct, header_len=len(header) + delta))
        assert err.field in ("header", "ct", "envelope")
    assert refused(frame(header, ct, ct_len=len(ct) + 1)).field == "ct"
    assert refused(frame(header, ct, ct_len=len(ct) - 1)).field == "envelope"


def test_magic_and_version_byte() -> None:
    data = sealed().to_binary()
    assert refused(b"XXXX" + data[4:]).field == "magic"
    err = refused(b"VEN3" + data[4:])
    assert err.field == "v" and "VEN2" in err.reason
    assert refused(b'{"v":2' + data[6:]).field == "magic"  # a JSON body sent with the binary type


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": 1}, "v"),
        ({"v": 3}, "v"),
        ({"expires": 1.5}, "expires"),
        ({"expires": True}, "expires"),
        ({"direction": "sideways"}, "direction"),
        ({"request_id": "XYZ"}, "request_id"),
        ({"model": "../etc"}, "model"),
        ({"user": ""}, "user"),
        ({"ct": "AAAA"}, "envelope"),  # the ct is never in the header
        ({"extra": 1}, "envelope"),
    ],
)
def test_header_fields_are_checked_as_in_the_json_form(change: dict, field: str) -> None:
    env = sealed()
    header = canonical_json({**json.loads(env.aad()), **change})
    assert refused(frame(header, bytes(env.ct))).field == field


def test_header_must_be_a_canonical_json_object() -> None:
    env = sealed()
    fields = json.loads(env.aad())
    ct = bytes(env.ct)
    assert refused(frame(b"\xff\xfe{", ct)).field == "header"
    assert refused(frame(b"[1,2]", ct)).field == "header"
    missing = canonical_json({k: v for k, v in fields.items() if k != "expires"})
    assert refused(frame(missing, ct)).field == "envelope"
    spaced = json.dumps(fields, sort_keys=True).encode()  # same fields, another encoding
    err = refused(frame(spaced, ct))
    assert err.field == "header" and "canonical" in err.reason
    unsorted = json.dumps(dict(reversed(list(fields.items()))), separators=(",", ":")).encode()
    assert refused(frame(unsorted, ct)).field == "header"


def test_swapped_aad_fields_fail_authentication() -> None:
    """The header is authenticated: swapping model and user, moving the ct to another request
    or direction, or stretching the window is refused once the receiver opens it."""
    env = sealed(model="alice-model", user="bob")
    fields = json.loads(env.aad())
    ct = bytes(env.ct)
    for change in (
        {"model": "bob", "user": "alice-model"},
        {"request_id": new_request_id()},
        {"direction": "response"},
        {"expires": fields["expires"] + 3600},
    ):
        forged = Envelope.from_binary(frame(canonical_json({**fields, **change}), ct))
        with pytest.raises(IntegrityError):
            open_envelope(KEY, forged, model=forged.model, user=forged.user, direction=forged.direction)


@FAST
@given(st.integers(min_value=0))
def test_any_single_bit_flip_is_refused(bit: int) -> None:
    """Anywhere in the frame (prefix, header, nonce, ciphertext, tag): refused, never opened."""
    env = sealed(b"some input tensors")
    data = bytearray(env.to_binary())
    bit %= len(data) * 8
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CryptoError):
        forged = Envelope.from_binary(bytes(data))
        open_envelope(KEY, forged, model=forged.model, user=forged.user, direction="request")
