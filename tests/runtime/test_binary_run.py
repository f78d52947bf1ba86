"""`/run` with a binary envelope body (`veil.wire.run`): the real RuntimeCore behind the real
OpenWhisk action server, over HTTP. The envelope is read without base64 or JSON, answered as a
binary response envelope; the activation fields come from headers; every refusal is a JSON
error naming the field; the JSON form keeps working next to it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from runtime_support import MODEL, Harness, reference

from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, new_request_id, open_envelope, seal
from veil.runtime import tensors
from veil.runtime.action_server import ActionServer, ActionState, make_handler
from veil.runtime.tee_action import TeeAction
from veil.wire.run import FIELD_HEADERS

USER = "u1"


@pytest.fixture
def url(harness: Harness, trained, clock) -> Iterator[str]:
    clock.now = time.time()
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, USER)
    action = object.__new__(TeeAction)  # a TeeAction without attestation: its run() over this core
    action.core = harness.core
    state = ActionState(threads=4, queue=8)
    state.action = action
    server = ActionServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sealed(harness: Harness, x: np.ndarray, **kw) -> Envelope:
    return seal(
        harness.releases.users[(MODEL, USER)][0],
        tensors.encode({"input": x}),
        model=MODEL,
        user=USER,
        request_id=kw.pop("request_id", new_request_id()),
        direction="request",
        expires=int(time.time()) + 120,
    )


def headers(deadline_ms: int | None = None) -> dict[str, str]:
    deadline_ms = int(time.time() * 1000) + 60_000 if deadline_ms is None else deadline_ms
    return {
        "Content-Type": BINARY_CONTENT_TYPE,
        FIELD_HEADERS["activation_id"]: uuid.uuid4().hex,
        FIELD_HEADERS["deadline"]: str(deadline_ms),
    }


def post(url: str, body: bytes, hdrs: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/run", content=body, headers=hdrs, timeout=30)


def test_binary_request_is_answered_with_a_binary_envelope(url, harness, trained):
    env = sealed(harness, trained.x)
    answer = post(url, env.to_binary(), headers())
    assert answer.status_code == 200 and answer.headers["content-type"] == BINARY_CONTENT_TYPE
    response = Envelope.from_binary(answer.content)
    plaintext = open_envelope(
        harness.releases.users[(MODEL, USER)][0],
        response,
        model=MODEL,
        user=USER,
        direction="response",
        request_id=env.request_id,
        expires=env.expires,
    )
    got = tensors.decode(plaintext)
    want = reference(trained.v1, trained.x)
    assert all(np.allclose(got[k], want[k]) for k in want)


def test_json_form_still_answers_json(url, harness, trained):
    env = sealed(harness, trained.x)
    answer = httpx.post(f"{url}/run", json={"value": {"envelope": env.to_json()}}, timeout=30)
    assert answer.headers["content-type"] == "application/json"
    assert Envelope.from_json(answer.json()["envelope"]).request_id == env.request_id


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda b: b[:9], "envelope"),
        (lambda b: b[:-1], "ct"),
        (lambda b: b + b"\x00", "envelope"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:30], "header"),
    ],
    ids=["short-prefix", "truncated-ct", "trailing", "magic", "truncated-header"],
)
def test_malformed_binary_bodies_are_json_errors_naming_the_field(url, harness, trained, damage, field):
    answer = post(url, damage(sealed(harness, trained.x).to_binary()), headers())
    assert answer.status_code == 200  # an application error: the instance stays
    err = answer.json()["error"]
    assert err["code"] == "malformed" and err["status"] == 400 and err["message"].startswith(f"{field}:"), err


def test_tampered_ct_is_refused_and_a_replay_is_answered_encrypted(url, harness, trained):
    env = sealed(harness, trained.x)
    data = bytearray(env.to_binary())
    data[-1] ^= 1
    err = post(url, bytes(data), headers()).json()["error"]
    assert (err["code"], err["status"]) == ("integrity", 400)
    assert post(url, env.to_binary(), headers()).status_code == 200
    replay = post(url, env.to_binary(), headers()).json()["error"]
    assert replay["code"] == "replay" and "envelope" in replay  # encrypted errors keep the JSON form
    assert Envelope.from_json(replay["envelope"]).direction == "response"


def test_activation_deadline_comes_from_its_header(url, harness, trained):
    past = int(time.time() * 1000) - 1000
    err = post(url, sealed(harness, trained.x).to_binary(), headers(past)).json()["error"]
    assert err["code"] == "deadline_exceeded"
    bad = post(url, sealed(harness, trained.x).to_binary(), {**headers(), FIELD_HEADERS["deadline"]: "soon"})
    assert bad.json()["error"]["message"].startswith("deadline:")
