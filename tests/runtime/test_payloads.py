"""The plaintexts inside envelopes: tensors with request options or response timings, and the
error payload, told apart by their magic; parsers refuse what they do not know."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.errors import MalformedError
from veil.runtime import tensors

X = {"input": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_decode_still_returns_just_the_tensors():
    data = tensors.encode(X, options=tensors.RequestOptions(timings=True))
    out = tensors.decode(data)
    assert list(out) == ["input"] and out["input"].tolist() == X["input"].tolist()


def test_options_and_timings_travel_in_the_header():
    data = tensors.encode(X, options=tensors.RequestOptions(timings=True))
    assert data[:4] == b"VTN1"
    (n,) = struct.unpack(">I", data[4:8])
    assert json.loads(data[8 : 8 + n]) == {
        "tensors": [{"name": "input", "dtype": "float32", "shape": [2, 3]}],
        "options": {"timings": True},
    }
    _, meta = tensors.decode_with_meta(data)
    assert tensors.request_options(meta) == tensors.RequestOptions(timings=True)
    assert tensors.request_options(tensors.decode_with_meta(tensors.encode(X))[1]) == tensors.RequestOptions()
    _, meta = tensors.decode_with_meta(tensors.encode(X, timings={"infer_ms": 1.5, "model_cached": True}))
    assert meta == {"timings": {"infer_ms": 1.5, "model_cached": True}}


def _with_header(header: dict) -> bytes:
    head = json.dumps(header).encode()
    return b"VTN1" + struct.pack(">I", len(head)) + head + X["input"].tobytes()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"options": {"timings": "yes"}}, "options.timings"),
        ({"options": {"debug": True}}, "options"),
        ({"options": []}, "options"),
        ({"timings": {"a": "slow"}}, "timings"),
        ({"plain": True}, "tensors"),
    ],
)
def test_unknown_or_bad_header_fields_are_refused_by_name(extra, field):
    with pytest.raises(MalformedError) as exc:
        tensors.decode_with_meta(
            _with_header({"tensors": [{"name": "input", "dtype": "float32", "shape": [2, 3]}], **extra})
        )
    assert exc.value.field == field


def test_error_payload_round_trip_and_layout():
    data = tensors.encode_error("bad_input", "inputs.input: dtype float64, model expects float32")
    body = b'{"error":{"code":"bad_input","message":"inputs.input: dtype float64, model expects float32"}}'
    assert data == b"VER1" + struct.pack(">I", len(body)) + body
    assert tensors.is_error(data) and not tensors.is_error(tensors.encode(X))
    assert tensors.decode_error(data) == ("bad_input", "inputs.input: dtype float64, model expects float32")
    with pytest.raises(MalformedError, match="error payload"):
        tensors.decode(data)
    with pytest.raises(MalformedError):
        tensors.decode_error(tensors.encode(X))
    with pytest.raises(MalformedError):
        tensors.decode_error(data + b"x")
    with pytest.raises(MalformedError):
        tensors.encode_error("Not A Code", "x")


@settings(max_examples=60, deadline=None)
@given(st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z"), st.text(max_size=200))
def test_error_payload_round_trips(code: str, message: str):
    assert tensors.decode_error(tensors.encode_error(code, message)) == (code, message)


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4], [10**30], [2**31 + 1]])
def test_hostile_shapes_are_refused_before_allocation(shape) -> None:
    """Shapes whose element count overflows int64 (or is merely huge) are a MalformedError naming
    the shape, never a ValueError from NumPy or an allocation."""
    head = json.dumps({"tensors": [{"name": "x", "dtype": "float32", "shape": shape}]}).encode()
    with pytest.raises(MalformedError, match=r"tensors\.x\.shape"):
        tensors.decode(tensors.MAGIC + struct.pack(">I", len(head)) + head)
