"""Tampered, swapped, replayed, expired and truncated ciphertexts, tampered sealed models, and bad
input: each is refused with a clear error, and the instance that saw it stays healthy (no crash,
no half-filled cache entry; the next good request is served). Errors found after the request
authenticated say only their code in clear; the detail is in an envelope only the user opens."""

from __future__ import annotations

import copy
import os
import re
import time

import numpy as np
import pytest
from e2e_support import (
    assert_matches_reference,
    error_of,
    gateway_post,
)

from veil.crypto import chunked
from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import CLOCK_SKEW_S, MAX_LIFETIME_S, Envelope, new_request_id, open_envelope, seal
from veil.crypto.keys import SymmetricKey
from veil.deployment import TEE_FUNCTION
from veil.errors import VeilError
from veil.runtime import tensors

LR, MLP = "breast-cancer-lr", "digits-mlp"


@pytest.fixture
def healthy(stack):
    """Checks, after the test body, that no instance crashed and a good request still works."""
    stack.infer(stack.user, LR, stack.models[LR].x_test[:1])  # the function exists (packer deploys lazily)
    before = stack.platform.metrics(TEE_FUNCTION)["crashes"]
    yield
    for model_id in (LR, MLP):
        model = stack.models[model_id]
        x = model.x_test[:3]
        assert_matches_reference(model, x, stack.infer(stack.user, model_id, x))
    assert stack.platform.metrics(TEE_FUNCTION)["crashes"] == before, "an instance crashed"


def _infer_path(model_id: str) -> str:
    return f"/v1/models/{model_id}:infer"


def _sealed(stack, model_id: str, x: np.ndarray, user=None) -> tuple[str, dict]:
    user = user or stack.user
    stack.secrets.tensors(f"input {model_id}", {"input": x})
    return user.sealed_request(model_id, {"input": x})


def _with_ct(env: dict, ct: bytes) -> dict:
    return {**env, "ct": b64e(ct)}


GENERIC = "request failed; details are in the encrypted envelope"


def _enveloped_detail(stack, sent: dict, body: dict) -> tuple[str, str]:
    """Open the encrypted error of an answer (the envelope beside or inside the error object)."""
    err = body.get("error") or {}
    answer = body.get("envelope") or err.get("envelope")
    assert isinstance(answer, dict), f"no encrypted error in {body}"
    plain = open_envelope(
        stack.user.request_keys[sent["model"]],
        Envelope.from_json(answer),
        model=sent["model"],
        user=sent["user"],
        direction="response",
        request_id=sent["request_id"],
        expires=sent["expires"],
    )
    return tensors.decode_error(plain)


def test_bit_flip_in_ciphertext_is_rejected(stack, healthy):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    ct = b64d(env["ct"])
    for position in (0, 12, len(ct) // 2, len(ct) - 1):  # nonce, first data byte, middle, tag
        flipped = bytearray(ct)
        flipped[position] ^= 0x01
        r = gateway_post(stack, _infer_path(LR), _with_ct(env, bytes(flipped)))
        assert r.status_code == 400, (position, r.text)
        err = error_of(r)
        assert err["code"] == "integrity", err
        assert "authenticate" in err["message"], err
    # the untouched envelope is still accepted
    assert gateway_post(stack, _infer_path(LR), env).status_code == 200


def test_envelope_moved_to_another_registered_user_is_rejected(stack, healthy):
    other = stack.new_user([LR])  # granted, with its own request key: a real release happens
    x = stack.models[LR].x_test[:1]
    assert_matches_reference(stack.models[LR], x, stack.infer(other, LR, x))
    _, env = _sealed(stack, LR, x)
    r = gateway_post(stack, _infer_path(LR), {**env, "user": other.id})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "integrity"


def test_response_replayed_as_request_is_rejected(stack, healthy):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    r = gateway_post(stack, _infer_path(LR), env)
    assert r.status_code == 200, r.text
    response_env = r.json()["envelope"]
    assert response_env["direction"] == "response"

    # as it is: refused for its direction
    r = gateway_post(stack, _infer_path(LR), response_env)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "malformed" and "direction" in err["message"], err

    # relabelled as a request: the direction is in the AAD and the response key differs
    r = gateway_post(stack, _infer_path(LR), {**response_env, "direction": "request"})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "integrity"


def test_request_replayed_under_another_request_id_is_rejected(stack, healthy):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    r = gateway_post(stack, _infer_path(LR), {**env, "request_id": new_request_id()})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "integrity"


@pytest.mark.parametrize("keep", [-1, -16, 30, 27, 0])
def test_truncated_ciphertext_is_rejected(stack, healthy, keep):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    ct = b64d(env["ct"])
    r = gateway_post(stack, _infer_path(LR), _with_ct(env, ct[:keep]))
    assert r.status_code == 400, r.text
    err = error_of(r)
    if len(ct[:keep]) >= 28:  # nonce + tag present: the tag check fails
        assert err["code"] == "integrity", err
    else:  # too short to even hold a nonce and a tag
        assert err["code"] == "malformed" and re.search(r"\bct\b|ciphertext", err["message"]), err


def test_envelope_for_model_a_sent_to_model_b_is_rejected(stack, healthy):
    x = stack.models[LR].x_test[:1]
    _, env = _sealed(stack, LR, x)
    # the URL names another model than the envelope
    r = gateway_post(stack, _infer_path(MLP), env)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "malformed" and LR in err["message"] and MLP in err["message"], err
    # the envelope relabelled for model B (the user holds B's key too): the AAD no longer matches
    r = gateway_post(stack, _infer_path(MLP), {**env, "model": MLP})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "integrity"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: {**e, "v": 1},
        lambda e: {**e, "v": 3},
        lambda e: {**e, "ct": e["ct"] + "!"},
        lambda e: {k: v for k, v in e.items() if k != "ct"},
        lambda e: {k: v for k, v in e.items() if k != "expires"},
        lambda e: {**e, "expires": "soon"},
        lambda e: {**e, "extra": 1},
        lambda e: {**e, "request_id": "not-hex"},
    ],
    ids=[
        "version-1",
        "version-3",
        "ct-not-base64url",
        "missing-ct",
        "missing-expires",
        "expires-not-int",
        "unknown-field",
        "bad-request-id",
    ],
)
def test_malformed_envelope_is_rejected_by_name(stack, healthy, mutate):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    r = gateway_post(stack, _infer_path(LR), mutate(copy.deepcopy(env)))
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "malformed"


def test_non_json_body_is_rejected(stack, healthy):
    r = gateway_post(stack, _infer_path(LR), b"{not json")
    assert r.status_code == 400
    assert error_of(r)["code"] == "malformed"


# -- sealed models in the store -----------------------------------------------------------------


def _models_cached(stack) -> set[str]:
    return {m for s in stack.instance_stats().values() for m in s["models_cached"]}


def _store_file(stack, model_id: str, version: int):
    return stack.deployment.store_dir / "models" / model_id / f"v{version}.veilm"


def _versions(stack, model_id: str) -> list[int]:
    folder = stack.deployment.store_dir / "models" / model_id
    return sorted(int(p.name[1:].split(".")[0]) for p in folder.glob("v*.veilm"))


@pytest.mark.parametrize(
    "damage",
    [
        "flip-last-byte",
        "flip-chunk-byte",
        "flip-header-byte",
        "truncate",
        "drop-final-chunk",
        "other-models-file",
        "not-a-sealed-file",
    ],
)
def test_tampered_sealed_model_is_refused_and_not_cached(stack, healthy, damage):
    model = stack.models[LR]
    model_id = f"tampered-{damage}"
    key = stack.publish(model_id, model.onnx)
    stack.owner.grant(model_id, stack.user.id)
    stack.user.request_access(model_id)
    stack.secrets.key(f"request key {model_id}", stack.user.request_keys[model_id])

    # a sealed file with several chunks, so dropping whole chunks is possible too
    (version,) = _versions(stack, model_id)
    good = chunked.seal_bytes(key, model.onnx, model=model_id, version=version, chunk_size=1024)
    path = _store_file(stack, model_id, version)
    bad = bytearray(good)
    if damage == "flip-last-byte":
        bad[-1] ^= 0x80
    elif damage == "flip-chunk-byte":
        bad[len(bad) // 2] ^= 0x01
    elif damage == "flip-header-byte":  # inside the header's file_id: still valid JSON
        at = bytes(bad).index(b'"file_id":"') + len('"file_id":"') + 3
        bad[at] ^= 0x01
    elif damage == "truncate":
        bad = bad[: len(bad) - 100]
    elif damage == "other-models-file":  # the store serves another model's sealed file
        bad = bytearray(_store_file(stack, MLP, _versions(stack, MLP)[-1]).read_bytes())
    elif damage == "not-a-sealed-file":
        bad = bytearray(os.urandom(4096))
    else:
        last = len(model.onnx) % 1024 or 1024
        bad = bad[: len(bad) - (4 + 12 + last + 16)]
    path.write_bytes(bytes(bad))  # the untrusted store (or whoever controls it) changed the file

    x = model.x_test[:2]
    with pytest.raises(VeilError) as info:
        stack.infer(stack.user, model_id, x)
    assert info.value.code == "model_integrity", (info.value.code, info.value.message)
    assert info.value.status == 403
    assert model_id in info.value.message
    assert model_id not in _models_cached(stack)

    # the same request again: still refused, still not cached (no half-filled entry served)
    with pytest.raises(VeilError) as info:
        stack.infer(stack.user, model_id, x)
    assert info.value.code == "model_integrity"
    assert model_id not in _models_cached(stack)

    # the store serves the good file again: served, correct, and now cached
    path.write_bytes(good)
    assert_matches_reference(model, x, stack.infer(stack.user, model_id, x))
    assert model_id in _models_cached(stack)


def test_sealed_model_for_another_model_is_refused_at_upload(stack):
    model_id = "upload-check"
    key = SymmetricKey.generate()
    onnx = stack.models[LR].onnx
    version = stack.owner.keyservice.stage_version(
        model_id, key, chunked.content_digest(key, onnx), measurements=stack.trust.runtime_measurements
    )
    sealed = chunked.seal_bytes(key, onnx, model="some-other-model", version=version)
    with pytest.raises(VeilError) as info:
        stack.owner.upload_sealed(model_id, version, sealed)
    assert info.value.code == "malformed" and "some-other-model" in info.value.message, info.value.message
    with pytest.raises(VeilError) as info:
        stack.owner.upload_sealed(model_id, version, onnx)  # plaintext ONNX
    assert info.value.code == "malformed"


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        (lambda x: {"input": x[:, :29]}, ["inputs.input", "shape", "29"]),
        (lambda x: {"input": x.astype(np.float64)}, ["inputs.input", "dtype", "float64", "float32"]),
        (lambda x: {"input": x[0]}, ["inputs.input", "rank"]),
        (lambda x: {"features": x}, ["input", "features"]),
        (lambda x: {"input": x, "extra": x}, ["input", "extra"]),
    ],
    ids=["shape", "dtype", "rank", "name", "extra-input"],
)
def test_bad_input_is_refused_naming_the_input(stack, healthy, inputs, words):
    x = stack.models[LR].x_test[:2]
    with pytest.raises(VeilError) as info:
        stack.user.infer(LR, inputs(x))
    err = info.value
    assert (err.code, err.status) == ("bad_input", 400), (err.code, err.message)
    for word in words:
        assert word in err.message, (word, err.message)


def test_bad_input_detail_is_not_in_clear(stack, healthy):
    """A wrongly named input: in clear only the code and a fixed message (no tensor name, shape,
    dtype or the model's input signature); the detail is inside the encrypted answer."""
    x = stack.models[LR].x_test[:2]
    _, env = _sealed(stack, LR, x.astype(np.float64)[:, :29], user=None)
    stack.secrets.tensors(f"input {LR}", {"features": x})
    renamed = stack.user.sealed_request(LR, {"features": x})[1]
    for sent, words in ((renamed, ["features", "input"]), (env, ["float64", "float32", "inputs.input"])):
        r = gateway_post(stack, _infer_path(LR), sent)
        assert r.status_code == 400, r.text
        err = error_of(r)
        body = r.json()
        # exhaustively what travels in clear: the code, the fixed message, the envelope's header
        # (the request's own header, direction flipped) and its ciphertext
        assert set(body) <= {"error", "envelope"} and set(err) <= {"code", "message", "envelope"}, body
        assert (err["code"], err["message"]) == ("bad_input", GENERIC), err
        answer = body.get("envelope") or err.get("envelope")
        assert isinstance(answer, dict), f"the gateway dropped the encrypted error: {body}"
        assert {k: v for k, v in answer.items() if k != "ct"} == {
            **{k: v for k, v in sent.items() if k != "ct"},
            "direction": "response",
        }
        code, message = _enveloped_detail(stack, sent, r.json())
        assert code == "bad_input" and all(w in message for w in words), message


def test_garbage_plaintext_inside_a_valid_envelope_is_refused(stack, healthy):
    """The envelope authenticates, but its plaintext is not a tensor payload."""
    key = stack.user.request_keys[LR]
    rid = new_request_id()
    env = seal(key, b"VTN1\xff\xff\xff\xffgarbage", model=LR, user=stack.user.id, request_id=rid, direction="request")
    r = gateway_post(stack, _infer_path(LR), env.to_json())
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "malformed" and err["message"] == GENERIC, err
    code, message = _enveloped_detail(stack, env.to_json(), r.json())
    assert code == "malformed" and "tensors" in message, message


# -- validity window ---------------------------------------------------------------------------


def test_expired_envelope_is_refused(stack, healthy):
    x = stack.models[LR].x_test[:1]
    _, env = stack.user.sealed_request(LR, {"input": x}, expires=int(time.time()) - CLOCK_SKEW_S - 5)
    r = gateway_post(stack, _infer_path(LR), env)
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "expired"


def test_envelope_expiring_too_far_ahead_is_refused_naming_expires(stack, healthy):
    x = stack.models[LR].x_test[:1]
    far = int(time.time()) + MAX_LIFETIME_S + CLOCK_SKEW_S + 60
    _, env = stack.user.sealed_request(LR, {"input": x}, expires=far)
    r = gateway_post(stack, _infer_path(LR), env)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "malformed" and "expires" in err["message"], err


def test_stretched_window_does_not_authenticate(stack, healthy):
    _, env = _sealed(stack, LR, stack.models[LR].x_test[:1])
    r = gateway_post(stack, _infer_path(LR), {**env, "expires": env["expires"] + 60})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "integrity"


def test_unknown_model_is_a_clear_error(stack, healthy):
    key = SymmetricKey.generate()
    env = seal(
        key,
        tensors.encode({"input": stack.models[LR].x_test[:1]}),
        model="no-such-model",
        user=stack.user.id,
        request_id=new_request_id(),
        direction="request",
    )
    r = gateway_post(stack, _infer_path("no-such-model"), env.to_json())
    assert r.status_code == 404, r.text
    err = error_of(r)
    assert err["code"] == "unknown_model" and "no-such-model" in err["message"], err


def test_model_with_key_but_no_sealed_file_is_a_clear_error(stack, healthy):
    model_id = "key-but-no-file"
    key = SymmetricKey.generate()
    stack.model_keys[model_id] = key
    stack.secrets.key(f"model key {model_id}", key)
    stack.owner.keyservice.put_model_key(model_id, key, stack.trust.runtime_measurements)
    stack.owner.grant(model_id, stack.user.id)
    stack.user.request_access(model_id)
    stack.secrets.key(f"request key {model_id}", stack.user.request_keys[model_id])
    with pytest.raises(VeilError) as info:
        stack.user.infer(model_id, stack.models[LR].x_test[:1])
    assert (info.value.code, info.value.status) == ("unknown_model", 404), info.value.message
    assert "model store" in info.value.message


def test_user_without_grant_is_refused(stack, healthy):
    stranger = stack.new_user([LR], grant=False)
    with pytest.raises(VeilError) as info:
        stranger.infer(LR, stack.models[LR].x_test[:1])
    assert (info.value.code, info.value.status) == ("not_granted", 403), info.value.message


def test_warm_instance_has_no_plaintext_path(stack, healthy):
    x = stack.models[LR].x_test[:1]
    value = {"plain": {"model": LR, "user": stack.user.id, "tensors": b64e(tensors.encode({"input": x}))}}
    # make sure a warm instance (that holds LR's keys and model) is the one asked
    stack.infer(stack.user, LR, x)
    instances = [i for i in stack.tee_instances() if i.state == "ready"]
    assert instances
    from veil.platform.local import ActionError

    for inst in instances:
        with pytest.raises(ActionError) as info:
            stack.platform.invoke_instance(TEE_FUNCTION, inst.id, value, timeout=10)
        assert info.value.status == 400
        assert info.value.body["code"] == "malformed", info.value.body


def test_envelope_built_by_hand_matches_sdk(stack):
    """A control for the tests above: a hand-sealed envelope (as they build) is served."""
    x = stack.models[MLP].x_test[:2]
    rid, env = _sealed(stack, MLP, x)
    r = gateway_post(stack, _infer_path(MLP), env)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"envelope"}, "nothing but the envelope in clear (no timings)"
    answer = Envelope.from_json(r.json()["envelope"])
    assert answer.expires == env["expires"]
    plain = open_envelope(
        stack.user.request_keys[MLP], answer, model=MLP, user=stack.user.id, direction="response", request_id=rid
    )
    out = tensors.decode(plain)
    stack.secrets.tensors(f"output {MLP}", out)
    assert_matches_reference(stack.models[MLP], x, out)
