"""`chunked.open_into` (decrypt into one preallocated buffer) is `open_bytes`, result for result.

On hypothesis-generated sealed files and on every tampering the chunked format must refuse
(bit flips, reordered, dropped, duplicated, truncated or extended chunks, chunks moved between
files, wrong model, version, digest or key, cut files, trailing data), `open_into` returns the
same plaintext or raises the same exception (class, and field for MalformedError) as
`open_bytes`, whether it is told the sealed file's size or not. A file whose plaintext does not
fit the size the store reported is refused; the plaintext lives in one bytearray, trimmed to its length.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.crypto import chunked
from veil.crypto.errors import IntegrityError, MalformedError
from veil.crypto.keys import SymmetricKey

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = SymmetricKey(bytes(range(32)))
OTHER = SymmetricKey(bytes(range(1, 33)))


def _outcome(fn: Any) -> tuple:
    try:
        return ("ok", bytes(fn()))
    except MalformedError as exc:
        return ("malformed", exc.field)
    except IntegrityError:
        return ("integrity",)


def _same(sealed: bytes, key: SymmetricKey = KEY, **kw: Any) -> tuple:
    """open_bytes' outcome, checked equal to open_into's with and without the sealed size."""
    want = _outcome(lambda: chunked.open_bytes(key, sealed, **kw))
    for size in (len(sealed), None):
        got = _outcome(lambda: chunked.open_into(key, io.BytesIO(sealed), sealed_size=size, **kw))  # noqa: B023
        assert got == want, (size, got, want)
    return want


def _records(sealed: bytes) -> tuple[bytes, list[bytes]]:
    (hlen,) = struct.unpack(">I", sealed[8:12])
    prefix, rest, records = sealed[: 12 + hlen], sealed[12 + hlen :], []
    while rest:
        (n,) = struct.unpack(">I", rest[:4])
        records.append(rest[: 4 + n])
        rest = rest[4 + n :]
    return prefix, records


@FAST
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=9))
def test_open_into_equals_open_bytes(plaintext: bytes, chunk_size: int, version: int) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", version=version, chunk_size=chunk_size)
    digest = chunked.content_digest(KEY, plaintext)
    assert _same(sealed, model="m", version=version, digest=digest) == ("ok", plaintext)
    assert _same(sealed, model="m") == ("ok", plaintext)
    out = chunked.open_into(KEY, io.BytesIO(sealed), model="m", sealed_size=len(sealed))
    assert type(out) is bytearray and out == plaintext


@FAST
@given(st.binary(min_size=1, max_size=120), st.integers(min_value=0), st.integers(min_value=1, max_value=40))
def test_open_into_refuses_every_bit_flip_as_open_bytes_does(plaintext: bytes, bit: int, chunk_size: int) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=chunk_size)
    bit %= len(sealed) * 8
    flipped = bytearray(sealed)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert _same(bytes(flipped), model="m")[0] != "ok"


@FAST
@given(st.binary(min_size=33, max_size=160), st.data())
def test_open_into_refuses_reordered_dropped_duplicated_truncated_extended(
    plaintext: bytes, data: st.DataObject
) -> None:
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=16)
    prefix, recs = _records(sealed)
    i = data.draw(st.integers(0, len(recs) - 2))
    variants = (
        recs[:i] + [recs[i + 1], recs[i]] + recs[i + 2 :],  # swapped
        recs[:i] + recs[i + 1 :],  # dropped
        recs[: i + 1] + [recs[i]] + recs[i + 1 :],  # duplicated
        recs[: i + 1],  # truncated after a chunk
        [*recs, recs[-1]],  # extended past the final chunk
    )
    for variant in variants:
        assert _same(prefix + b"".join(variant), model="m") == ("integrity",)
    cut = data.draw(st.integers(1, len(sealed) - 1))
    assert _same(sealed[:cut], model="m")[0] in ("integrity", "malformed")
    assert _same(sealed + b"\x00", model="m") == ("integrity",)


def test_open_into_refuses_moved_chunks_wrong_model_version_digest_key() -> None:
    a = chunked.seal_bytes(KEY, b"a" * 40, model="m", version=2, chunk_size=16)
    b = chunked.seal_bytes(KEY, b"b" * 40, model="m", version=2, chunk_size=16)
    pa, ra = _records(a)
    _, rb = _records(b)
    assert _same(pa + ra[0] + rb[1] + ra[2], model="m") == ("integrity",)
    assert _same(a, model="other") == ("malformed", "model")
    assert _same(a, model="m", version=1) == ("malformed", "version")
    assert _same(a, model="m", version=2, digest=chunked.content_digest(KEY, b"x")) == ("malformed", "digest")
    assert _same(a, OTHER, model="m") == ("integrity",)
    assert _same(b"NOTVEIL!" + b"\0" * 20, model="m") == ("malformed", "sealed_model")


def test_open_into_refuses_a_file_longer_than_the_store_said() -> None:
    plaintext = bytes(range(256)) * 40
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=1000)
    with pytest.raises(IntegrityError, match="longer than the store reported"):
        chunked.open_into(KEY, io.BytesIO(sealed), model="m", sealed_size=len(sealed) // 2)


def test_open_into_allocates_once_from_the_sealed_size_and_trims_in_place() -> None:
    plaintext = bytes(range(256)) * 4096  # 1 MiB in 64 KiB chunks
    sealed = chunked.seal_bytes(KEY, plaintext, model="m", chunk_size=1 << 16)
    assert chunked.plaintext_bound(len(sealed)) >= len(plaintext)
    out = chunked.open_into(KEY, io.BytesIO(sealed), model="m", sealed_size=len(sealed))
    assert out == plaintext
    # the trim kept the one allocation (a small shrink of a bytearray does not reallocate)
    assert out.__alloc__() >= chunked.plaintext_bound(len(sealed))
