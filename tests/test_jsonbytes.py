"""`veil.jsonbytes`: the same JSON object as `json.dumps` for every object (base64url bulk written
as it is, after the other fields; anything else escaped as usual; the same text when there is no
bulk), and `Encoded` keeping an object's exact bytes."""

from __future__ import annotations

import base64
import json
import os
import pickle

import pytest

from veil.jsonbytes import Encoded, dumps_object, is_plain


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).decode()


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "ciphertexts": [_b64(4000), _b64(3000)], "model": "lr", "x": 'é"\\', "n": None, "f": 1.5},
        {"ciphertexts": ['a"b' * 300]},  # quotes: escaped as json.dumps does
        {"ciphertexts": [_b64(900) + "\n"]},  # a control character
        {"ciphertexts": [_b64(900) + "é"]},  # not ASCII
        {"ciphertexts": [_b64(900), 5]},
        {"ciphertexts": []},
        {"ciphertexts": ["ab"]},  # short: json.dumps
        {1: "x", "ciphertexts": [_b64(900)]},  # a non-string key: json.dumps's rules
        {},
    ],
)
def test_same_object_as_json_dumps(obj):
    want = json.dumps(obj, separators=(",", ":"))
    got = dumps_object(obj)
    assert json.loads(got) == json.loads(want) and len(got) == len(want.encode())
    if not any(
        isinstance(v, list) and v and all(isinstance(s, str) and len(s) >= 512 for s in v) for v in obj.values()
    ):
        assert got == want.encode()  # nothing to write as it is: json.dumps's own text
    bulk = dumps_object({"ciphertexts": [_b64(900)], "v": 1})
    assert bulk.startswith(b'{"v":1,"ciphertexts":["') and bulk.endswith(b'"]}')


def test_trusted_strings_are_not_checked_but_the_rest_is_still_encoded():
    out = dumps_object({"model": 'a"b', "ciphertexts": ["QUJD", "REVG"]}, trusted=True)
    assert out == b'{"model":"a\\"b","ciphertexts":["QUJD","REVG"]}' and json.loads(out)["model"] == 'a"b'


def test_nan_and_unencodable_values_are_refused_as_json_dumps_does():
    with pytest.raises(ValueError):
        dumps_object({"ciphertexts": [_b64(900)], "x": float("nan")})
    with pytest.raises(TypeError):
        dumps_object({"ciphertexts": [_b64(900)], "x": object()})


def test_is_plain():
    assert is_plain(_b64(100)) and not is_plain("a b") and not is_plain('a"') and not is_plain("é")


def test_encoded_is_its_object_with_its_bytes_and_survives_pickling():
    e = Encoded({"a": [1]}, b'{"a":[1]}')
    assert e == {"a": [1]} and json.loads(e.encoded) == e
    back = pickle.loads(pickle.dumps(e))
    assert back == e and back.encoded == e.encoded


def test_a_run_answer_keeps_its_bytes_only_when_asked_and_errors_stay_errors():
    from veil.platform.errors import ActionError
    from veil.platform.instance import parse_run

    body = b'{"v":1,"ciphertexts":["QUJD"]}'
    kept = parse_run("f", 200, body, "application/json", keep_encoding=True)
    assert isinstance(kept, Encoded) and kept.encoded == body and kept == json.loads(body)
    assert not isinstance(parse_run("f", 200, body, "application/json"), Encoded)
    with pytest.raises(ActionError) as err:
        parse_run("f", 200, b'{"error":{"code":"bad_request","message":"no","status":400}}', keep_encoding=True)
    assert err.value.status == 400
    with pytest.raises(ActionError, match="JSON object"):
        parse_run("f", 200, b"[1]", keep_encoding=True)


def test_the_he_action_answer_is_its_json_encoded_once(tmp_path):
    """The runtime's HE answer carries its bytes; they are exactly its JSON."""
    from veil.he import store
    from veil.he.action import HEAction
    from veil.he.client import HEClient
    from veil.he.compile import compile_model
    from veil.he.tasks import breast_cancer_lr
    from veil.he.wire import InferRequest, UploadKeys

    task = breast_cancer_lr()
    store.publish(tmp_path, "lr", compile_model(task.model, task.x_train, name="lr"))
    client = HEClient(store.client_spec(tmp_path, "lr"))
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    action.run({**UploadKeys("lr", client.eval_keys()).to_json(), "op": "upload_keys"})
    batch = client.encrypt(task.x_test[:1], "latency")
    req = InferRequest("lr", client.key_id, batch.packing, batch.batch, batch.features, batch.ciphertexts)
    answer = action.run({**req.to_json(), "op": "infer"})
    assert isinstance(answer, Encoded)
    assert json.loads(answer.encoded) == dict(answer) and answer["ciphertexts"]
