"""The tampering cases of test_tampering.py on the binary envelope form
(`application/vnd.veil.envelope`, docs/protocol.md "Binary envelopes"), through the real
deployment: the gateway checks the header and hands the body on unchanged, the runtime reads it
in place. Every tampered, swapped, replayed, truncated or mis-framed envelope is refused with a
clear error naming the field, and the instance stays healthy."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
from e2e_support import assert_matches_reference, error_of
from test_tampering import LR, MLP, _sealed, healthy  # noqa: F401 - `healthy` is a fixture

from veil.crypto.encoding import b64d, canonical_json
from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, new_request_id, open_envelope
from veil.runtime import tensors

pytestmark = pytest.mark.usefixtures("healthy")  # no instance crashes; a good request still works after


def binary(env: dict, *, ct: bytes | None = None, header: bytes | None = None) -> bytes:
    """The binary form of a (possibly altered) JSON-form envelope, framed by hand."""
    header = canonical_json({k: v for k, v in env.items() if k != "ct"}) if header is None else header
    ct = b64d(env["ct"]) if ct is None else ct
    return b"VEN2" + struct.pack(">HI", len(header), len(ct)) + header + ct


def post(stack, model_id: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=stack.info.gateway_url, timeout=30.0) as client:
        return client.post(f"/v1/models/{model_id}:infer", content=body, headers={"content-type": BINARY_CONTENT_TYPE})


def refused(r: httpx.Response, code: str, field: str | None = None) -> None:
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == code, err
    if field is not None:
        assert err["message"].startswith(f"{field}:") or f"{field}:" in err["message"], err


def test_binary_round_trip_reaches_the_platform_unchanged(stack):
    """The SDK sends the binary form; the platform gets exactly those bytes (not re-encoded),
    and the answer comes back as a binary response envelope."""
    seen: list[object] = []
    platform = stack.platform
    invoke, invoke_instance = platform.invoke, platform.invoke_instance

    def recording(original):
        def call(*args, **kw):
            seen.append(args[-1].get("envelope"))  # the value, last positional argument
            return original(*args, **kw)

        return call

    platform.invoke, platform.invoke_instance = recording(invoke), recording(invoke_instance)
    try:
        _, env = _sealed(stack, LR, stack.models[LR].x_test[:2])
        body = binary(env)
        r = post(stack, LR, body)
    finally:
        del platform.invoke, platform.invoke_instance
    assert r.status_code == 200 and r.headers["content-type"] == BINARY_CONTENT_TYPE
    assert seen and all(isinstance(s, bytes) and s == body for s in seen), "the gateway re-encoded the envelope"
    answer = Envelope.from_binary(r.content)
    assert (answer.direction, answer.request_id, answer.expires) == ("response", env["request_id"], env["expires"])
    x = stack.models[LR].x_test[:3]
    assert_matches_reference(stack.models[LR], x, stack.infer(stack.user, LR, x))  # the SDK's own path


def test_bit_flips_are_rejected(stack):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    ct = b64d(env["ct"])
    for position in (0, 12, len(ct) // 2, len(ct) - 1):  # nonce, first data byte, middle, tag
        flipped = bytearray(ct)
        flipped[position] ^= 0x01
        refused(post(stack, LR, binary(env, ct=bytes(flipped))), "integrity")
    assert post(stack, LR, binary(env)).status_code == 200


def test_swapped_header_fields_are_rejected(stack):
    other = stack.new_user([LR])
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    refused(post(stack, LR, binary({**env, "user": other.id})), "integrity")  # moved to another user
    refused(post(stack, LR, binary({**env, "request_id": new_request_id()})), "integrity")
    refused(post(stack, LR, binary({**env, "expires": env["expires"] + 60})), "integrity")  # stretched
    # model A's envelope at model B's URL, then relabelled for B (the user holds B's key too)
    r = post(stack, MLP, binary(env))
    refused(r, "malformed")
    assert LR in error_of(r)["message"] and MLP in error_of(r)["message"]
    refused(post(stack, MLP, binary({**env, "model": MLP})), "integrity")


def test_response_replayed_as_request_is_rejected(stack):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    r = post(stack, LR, binary(env))
    assert r.status_code == 200, r.text
    response = r.content
    refused(post(stack, LR, response), "malformed", "envelope.direction")
    parsed = Envelope.from_binary(response)
    relabelled = {**json.loads(parsed.aad()), "direction": "request"}
    refused(post(stack, LR, binary(relabelled, ct=bytes(parsed.ct))), "integrity")
    replay = post(stack, LR, binary(env))  # the request itself, again: answered encrypted
    assert replay.status_code == 409 and error_of(replay)["code"] == "replay"


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda b: b[:9], "envelope"),
        (lambda b: b[:40], "header"),
        (lambda b: b[:-1], "ct"),
        (lambda b: b[:-28], "ct"),
        (lambda b: b + b"\x00", "envelope"),
        (lambda b: b"VEN3" + b[4:], "v"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack(">H", 0) + b[6:], "header_length"),
        (lambda b: b[:6] + struct.pack(">I", 3) + b[10:], "ct_length"),
    ],
    ids=[
        "short-prefix",
        "truncated-header",
        "truncated-ct",
        "no-tag",
        "trailing",
        "version",
        "magic",
        "header-len",
        "ct-len",
    ],
)
def test_mis_framed_envelopes_are_rejected_by_name(stack, damage, field):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    refused(post(stack, LR, damage(binary(env))), "malformed", field)


def test_non_canonical_or_malformed_headers_are_rejected(stack):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    fields = {k: v for k, v in env.items() if k != "ct"}
    refused(post(stack, LR, binary(env, header=json.dumps(fields).encode())), "malformed", "header")
    refused(post(stack, LR, binary({**env, "v": 1})), "malformed", "v")
    refused(post(stack, LR, binary({**env, "extra": 1})), "malformed", "envelope")
    refused(post(stack, LR, binary({**env, "request_id": "not-hex"})), "malformed", "request_id")
    refused(post(stack, LR, json.dumps(env).encode()), "malformed", "magic")  # JSON under the binary type


def test_the_json_form_is_still_answered_in_json(stack):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    with httpx.Client(base_url=stack.info.gateway_url, timeout=30.0) as client:
        r = client.post(f"/v1/models/{LR}:infer", json=env)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    answer = Envelope.from_json(r.json()["envelope"])
    payload = open_envelope(
        stack.user.request_keys[LR],
        answer,
        model=LR,
        user=env["user"],
        direction="response",
        request_id=env["request_id"],
        expires=env["expires"],
    )
    assert tensors.decode(payload)
