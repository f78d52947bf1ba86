"""Every parser that reads untrusted JSON refuses deep nesting with a clear error naming the
field, never a RecursionError (a 500 and a dropped connection over HTTP)."""

from __future__ import annotations

import io
import json
import struct

import pytest

from veil.attest.errors import AttestationError
from veil.attest.evidence import Evidence
from veil.attest.sim import verify_sim
from veil.crypto import chunked
from veil.crypto.encoding import b64e
from veil.crypto.errors import MalformedError
from veil.errors import BadRequest
from veil.http import parse_json_object
from veil.runtime import tensors

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_http_body() -> None:
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_json_object(DEEP)


def test_tensor_and_error_payload_headers() -> None:
    head = b"[" * 3000 + b"]" * 3000
    with pytest.raises(MalformedError, match="tensors"):
        tensors.decode(tensors.MAGIC + struct.pack(">I", len(head)) + head)
    with pytest.raises(MalformedError):
        tensors.decode_error(tensors.ERROR_MAGIC + struct.pack(">I", len(DEEP)) + DEEP)


def test_sealed_model_header() -> None:
    head = b"[" * 2000 + b"]" * 2000
    with pytest.raises(MalformedError, match="sealed_model"):
        chunked.read_header(io.BytesIO(chunked.MAGIC + struct.pack(">I", len(head)) + head))


def test_simulated_evidence() -> None:
    for raw in (DEEP, json.dumps({"body": b64e(DEEP), "sig": "AA"}).encode()):
        with pytest.raises(AttestationError):
            verify_sim(Evidence(kind="sim", raw=raw, report_data=b""), [b"\0" * 32])
