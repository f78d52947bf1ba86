"""After a request authenticates, every answer is a response envelope: errors carry only their
code and a fixed message in clear, the detail (tensor names, shapes, dtypes, the model's input
signature) travels encrypted and the SDK opens it. Timings never travel in clear either.

The runtime side is real (RuntimeCore behind the real OpenWhisk action server, over HTTP); the
SDK's gateway is an httpx transport that relays to the action server's /run as the gateway does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from runtime_support import MODEL, Harness, reference

from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, is_binary, new_request_id, seal
from veil.crypto.identity import Identity
from veil.errors import VeilError
from veil.runtime import tensors
from veil.runtime.action_server import ActionServer, ActionState, make_handler
from veil.runtime.core import GENERIC_MESSAGE
from veil.runtime.tee_action import TeeAction
from veil.sdk import ModelUser

# what must never appear in clear about the model's inputs or the request's tensors
LEAKY_WORDS = ["features", "input", "float32", "float64", "int64", "shape", "dtype", "rank", "expects", "29", "30"]


@dataclass
class Served:
    harness: Harness
    url: str
    user: ModelUser
    answers: list[httpx.Response] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)
    mutate: Any = None  # optional: body -> body, applied to the runtime's answer before the SDK sees it

    def run(self, envelope: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/run", json={"value": {"envelope": envelope}}, timeout=30)


def status_of(answer: httpx.Response) -> int:
    """The status a /run failure stands for: OpenWhisk-style, the HTTP status is 200 and the
    error carries it (`error.status`), which is what platforms read."""
    assert answer.status_code == 200, answer.text
    return answer.json()["error"]["status"]


def only_an_envelope(answer: httpx.Response) -> bool:
    """A success is the binary response envelope and nothing else: its whole body parses as one,
    whose clear header holds only the envelope's own fields."""
    assert is_binary(answer.headers.get("content-type")), answer.headers
    env = Envelope.from_binary(answer.content)
    return set(json.loads(env.aad())) == {"v", "model", "user", "request_id", "direction", "expires"}


def _clear_parts(body: dict[str, Any]) -> str:
    """The answer as the cloud sees it, minus the ciphertext bytes (random base64 may spell anything)."""
    body = json.loads(json.dumps(body))
    for holder in (body, body.get("error") if isinstance(body.get("error"), dict) else {}):
        env = holder.get("envelope") if isinstance(holder, dict) else None
        if isinstance(env, dict):
            env["ct"] = "<ct>"
    return json.dumps(body)


@pytest.fixture
def served(harness: Harness, trained, clock) -> Iterator[Served]:
    clock.now = time.time()  # the SDK seals with the real clock
    harness.publish(MODEL, 1, trained.v1)

    action = object.__new__(TeeAction)  # a TeeAction without attestation: its run() over this core
    action.core = harness.core
    state = ActionState(threads=4, queue=8)
    state.action = action
    server = ActionServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    # The SDK's ModelUser, built without a KeyService connection (only infer is exercised).
    user = object.__new__(ModelUser)
    user.identity = Identity.generate()
    user.request_keys = {MODEL: harness.grant(MODEL, user.identity.id)}
    user.last_timings = {}
    user._cards = {MODEL: None}  # no model card in this harness (no KeyService to vouch for one)
    s = Served(harness, url, user)

    def gateway(request: httpx.Request) -> httpx.Response:
        s.sent.append(request.content)
        if is_binary(request.headers.get("content-type")):  # the SDK's form: relayed as it came
            headers = {"Content-Type": BINARY_CONTENT_TYPE}
            answer = httpx.post(f"{s.url}/run", content=request.content, headers=headers, timeout=30)
        else:
            answer = s.run(json.loads(request.content))
        s.answers.append(answer)
        if is_binary(answer.headers.get("content-type")):
            return httpx.Response(answer.status_code, content=answer.content, headers=headers)
        body = answer.json()
        # as the platform and gateway do: an error's status travels in the error object
        status = body["error"]["status"] if isinstance(body.get("error"), dict) else answer.status_code
        if s.mutate is not None:
            body = s.mutate(body)
        return httpx.Response(status, json=body)

    user.gateway = httpx.Client(base_url="http://gateway.test", transport=httpx.MockTransport(gateway))
    try:
        yield s
    finally:
        user.gateway.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (lambda x: {"features": x}, ["inputs", "input", "features"]),
        (lambda x: {"input": x.astype(np.float64)}, ["inputs.input", "dtype", "float64", "float32"]),
        (lambda x: {"input": x[:, :29]}, ["inputs.input", "shape", "29", "30"]),
        (lambda x: {"input": x[0]}, ["inputs.input", "rank"]),
    ],
    ids=["name", "dtype", "shape", "rank"],
)
def test_an_error_after_decryption_says_nothing_in_clear(served, trained, inputs, words):
    with pytest.raises(VeilError) as info:
        served.user.infer(MODEL, inputs(trained.x))
    err = info.value
    assert (err.code, err.status) == ("bad_input", 400), (err.code, err.message)
    for word in words:  # the user gets the whole detail, decrypted
        assert word in err.message, (word, err.message)

    (answer,) = served.answers
    assert status_of(answer) == 400
    body = answer.json()
    # in clear: exactly the code, the fixed message and the envelope header (fields the request
    # had in clear already), nothing else
    sent = json.loads(Envelope.from_binary(served.sent[-1]).aad())  # the header the request had in clear
    envelope = body["error"]["envelope"]
    assert body == {"error": {"code": "bad_input", "message": GENERIC_MESSAGE, "envelope": envelope, "status": 400}}, (
        body
    )
    assert {k: v for k, v in envelope.items() if k != "ct"} == {
        **{k: v for k, v in sent.items() if k != "ct"},
        "direction": "response",
    }
    for word in LEAKY_WORDS:
        assert word not in GENERIC_MESSAGE
    assert "features" not in _clear_parts(body) and "float" not in _clear_parts(body)


def test_garbage_plaintext_in_an_authenticated_envelope_is_answered_encrypted(served):
    key = served.user.request_keys[MODEL]
    rid = new_request_id()
    garbage = b"VTN1\xff\xff\xff\xffgarbage"
    env = seal(key, garbage, model=MODEL, user=served.user.id, request_id=rid, direction="request")
    answer = served.run(env.to_json())
    assert status_of(answer) == 400
    err = answer.json()["error"]
    assert (
        err["code"] == "malformed"
        and err["message"] == GENERIC_MESSAGE
        and "tensors" not in _clear_parts(answer.json())
    )
    plain = served.harness.open_answer(env.to_json(), err["envelope"])
    code, message = tensors.decode_error(plain)
    assert code == "malformed" and "tensors" in message


def test_errors_before_authentication_stay_in_clear_without_an_envelope(served, trained):
    _, env = served.user.sealed_request(MODEL, {"input": trained.x})
    ct = bytearray(b64d(env["ct"]))
    ct[-1] ^= 1
    answer = served.run({**env, "ct": b64e(bytes(ct))})
    assert status_of(answer) == 400
    assert answer.json() == {
        "error": {
            "code": "integrity",
            "message": "envelope does not authenticate (tampered, swapped or wrong key)",
            "status": 400,
        }
    }
    stranger = {**env, "user": Identity.generate().id}
    answer = served.run(stranger)
    assert status_of(answer) == 403 and answer.json()["error"]["code"] == "not_granted"
    assert "envelope" not in answer.json()["error"]


def test_a_success_carries_no_timings_in_clear_and_timings_travel_inside_when_asked(served, trained):
    want = reference(trained.v1, trained.x)
    out = served.user.infer(MODEL, trained.x)
    np.testing.assert_array_equal(out["label"], want["label"])
    assert set(served.user.last_timings) == {"round_trip_ms"}
    assert only_an_envelope(served.answers[-1])

    out = served.user.infer(MODEL, trained.x, timings=True)
    np.testing.assert_array_equal(out["label"], want["label"])
    assert only_an_envelope(served.answers[-1]), "timings must not travel in clear"
    timings = served.user.last_timings
    assert {"round_trip_ms", "decrypt_ms", "infer_ms", "model_cached"} <= set(timings), timings
    assert timings["model_cached"] is True and timings["infer_ms"] >= 0

    # the first request of a cold core reports its key release and model load, inside
    fresh = served.harness.core.__class__(
        served.harness.core.config, served.harness.releases, served.harness.store, clock=time.time
    )
    rid, env = served.user.sealed_request(MODEL, {"input": trained.x}, timings=True)
    answer = fresh.infer(env)
    assert set(answer) == {"envelope"}
    _, meta = tensors.decode_with_meta(served.harness.open_answer(env, answer["envelope"]))
    assert {"key_release_ms", "model_fetch_decrypt_ms", "session_create_ms"} <= set(meta["timings"])
    assert meta["timings"]["model_cached"] is False


def test_an_error_envelope_that_does_not_authenticate_is_an_integrity_error(served, trained):
    def flip(body: dict[str, Any]) -> dict[str, Any]:
        env = body["error"]["envelope"]
        ct = bytearray(b64d(env["ct"]))
        ct[20] ^= 1
        body["error"] = {**body["error"], "message": "forged detail", "envelope": {**env, "ct": b64e(bytes(ct))}}
        return body

    served.mutate = flip
    with pytest.raises(VeilError) as info:
        served.user.infer(MODEL, {"features": trained.x})
    assert info.value.code == "integrity" and "forged" not in info.value.message


def test_the_sdk_also_reads_an_envelope_beside_the_error_object(served, trained):
    """A gateway may put the envelope at the top level of its error body."""

    def hoist(body: dict[str, Any]) -> dict[str, Any]:
        err = dict(body["error"])
        env = err.pop("envelope")
        return {"error": err, "envelope": env}

    served.mutate = hoist
    with pytest.raises(VeilError) as info:
        served.user.infer(MODEL, {"features": trained.x})
    assert info.value.code == "bad_input" and "features" in info.value.message and info.value.status == 400


def test_an_error_envelope_of_another_request_is_refused(served, trained):
    """A (valid) error envelope answering another request id cannot be passed off as this answer."""
    with pytest.raises(VeilError):
        served.user.infer(MODEL, {"features": trained.x})
    other = served.answers[-1].json()

    served.mutate = lambda body: other
    with pytest.raises(VeilError) as info:
        served.user.infer(MODEL, {"features": trained.x})
    assert info.value.code == "integrity"
