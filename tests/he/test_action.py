"""HEAction under bad input: every case is a clear HEError, and the instance keeps serving."""

import contextlib
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.encoding import b64e
from veil.he.action import HEAction
from veil.he.client import HEClient
from veil.he.errors import HEError
from veil.he.keys import EvalKeyBlob, unpack_eval_keys
from veil.he.seal_backend import check_header
from veil.he.wire import InferRequest


def _request(client, x, model, packing="latency"):
    b = client.encrypt(x, packing)
    return InferRequest(model, client.key_id, b.packing, b.batch, b.features, b.ciphertexts).to_json()


def _err(action, value):
    with pytest.raises(HEError) as info:
        action.run(value)
    return info.value


def _still_serves(action, lr_remote, lr_task):
    res = lr_remote.infer(lr_task.x_test[:2])
    assert list(res.predictions) == list(lr_task.model.predict(lr_task.x_test[:2]))


def test_unknown_key_then_reupload(he_store, lr_task):
    fresh = HEAction({"kind": "he", "store": str(he_store)})
    client = HEClient(fresh.run({"op": "spec", "model": "lr"})["spec"])
    err = _err(fresh, {"op": "infer", **_request(client, lr_task.x_test[:1], "lr")})
    assert (err.code, err.status) == ("unknown_key", 404)
    up = fresh.run({"op": "upload_keys", "v": 1, "model": "lr", "keys": b64e(client.eval_keys())})
    assert up["key_id"] == client.key_id and not up["cached"]
    again = fresh.run({"op": "upload_keys", "v": 1, "model": "lr", "keys": b64e(client.eval_keys())})
    assert again["cached"]
    assert fresh.run({"op": "infer", **_request(client, lr_task.x_test[:1], "lr")})["batch"] == 1


def test_ciphertext_for_other_parameters(action, lr_client, mlp_remote, mlp_client, lr_task, lr_remote):
    body = _request(lr_client, lr_task.x_test[:1], "mlp")  # N=4096 ciphertext to the N=8192 model
    body["key_id"] = mlp_client.key_id
    body["features"] = 64
    err = _err(action, {"op": "infer", **body})
    assert err.code in ("bad_ciphertext", "wrong_parameters")
    _still_serves(action, lr_remote, lr_task)


def test_keys_of_another_model_refused(action, lr_client, lr_task, mlp_remote):
    body = _request(lr_client, lr_task.x_test[:1], "mlp")
    body["features"] = 64
    err = _err(action, {"op": "infer", **body})
    assert err.code == "wrong_parameters"
    err = _err(action, {"op": "upload_keys", "v": 1, "model": "mlp", "keys": b64e(lr_client.eval_keys())})
    assert err.code == "wrong_parameters"


@pytest.mark.parametrize("cut", [0, 10, 16, 100, -1])
def test_truncated_ciphertext(action, lr_remote, lr_client, lr_task, cut):
    body = _request(lr_client, lr_task.x_test[:1], "lr")
    ct = lr_client.encrypt(lr_task.x_test[:1], "latency").ciphertexts[0]
    body["ciphertexts"] = [b64e(ct[:cut])]
    assert _err(action, {"op": "infer", **body}).code == "bad_ciphertext"
    _still_serves(action, lr_remote, lr_task)


@settings(max_examples=30, deadline=None)
@given(st.integers(16, 2000), st.integers(1, 255))
def test_corrupted_ciphertext_never_crashes(action, lr_remote, lr_client, lr_task, pos, flip):
    ct = bytearray(lr_client.encrypt(lr_task.x_test[:1], "latency").ciphertexts[0])
    ct[pos % len(ct)] ^= flip
    body = _request(lr_client, lr_task.x_test[:1], "lr")
    body["ciphertexts"] = [b64e(bytes(ct))]
    try:
        out = action.run({"op": "infer", **body})
        assert out["batch"] == 1  # CKKS has no integrity: garbage in, garbage out (docs/he.md)
    except HEError as exc:
        assert exc.code in ("bad_ciphertext", "wrong_parameters")


def test_wrong_feature_count(action, lr_client, lr_task):
    with pytest.raises(HEError) as info:
        lr_client.encrypt(lr_task.x_test[:1, :29])
    assert info.value.code == "wrong_features"
    body = _request(lr_client, lr_task.x_test[:1], "lr")
    body["features"] = 29
    assert _err(action, {"op": "infer", **body}).code == "wrong_features"
    body = _request(lr_client, lr_task.x_test[:1], "lr", "throughput")
    body["ciphertexts"] = body["ciphertexts"][:-1]
    assert _err(action, {"op": "infer", **body}).code == "wrong_features"


def test_missing_and_bad_keys(action, mlp_client):
    blob = unpack_eval_keys(mlp_client.eval_keys())
    no_relin = EvalKeyBlob(blob.params_digest, blob.galois_elements, None, blob.galois).pack()
    err = _err(action, {"op": "upload_keys", "v": 1, "model": "mlp", "keys": b64e(no_relin)})
    assert err.code == "missing_keys"
    truncated = EvalKeyBlob(blob.params_digest, blob.galois_elements, blob.relin[:-50], blob.galois).pack()
    err = _err(action, {"op": "upload_keys", "v": 1, "model": "mlp", "keys": b64e(truncated)})
    assert err.code == "bad_keys"
    lying = EvalKeyBlob(blob.params_digest, [*blob.galois_elements, 5], blob.relin, blob.galois).pack()
    assert _err(action, {"op": "upload_keys", "v": 1, "model": "mlp", "keys": b64e(lying)}).code == "bad_keys"
    assert _err(action, {"op": "upload_keys", "v": 1, "model": "mlp", "keys": "!!"}).code == "bad_request"


def test_malformed_requests(action, lr_client, lr_task):
    good = _request(lr_client, lr_task.x_test[:1], "lr")
    cases = [
        ({**good, "v": 2}, "bad_request"),
        ({**good, "packing": "magic"}, "bad_request"),
        ({**good, "batch": "1"}, "bad_request"),
        ({**good, "ciphertexts": []}, "bad_request"),
        ({**good, "key_id": "xyz"}, "bad_request"),
        ({**good, "model": "../etc"}, "bad_request"),
        ({**good, "model": "nope"}, "unknown_model"),
    ]
    for body, code in cases:
        assert _err(action, {"op": "infer", **body}).code == code
    assert _err(action, {"op": "frobnicate"}).code == "bad_request"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_random_blobs_are_refused_cleanly(data):
    for fn in (lambda: unpack_eval_keys(data), lambda: check_header(data, "ciphertext", 10**6)):
        with contextlib.suppress(HEError):
            fn()


def test_concurrent_requests(action, mlp_remote, lr_remote, mlp_task, lr_task):
    results, errors = {}, []

    def work(i):
        try:
            task, remote = (mlp_task, mlp_remote) if i % 2 else (lr_task, lr_remote)
            x = task.x_test[i : i + 2]
            results[i] = (remote.infer(x, packing="latency").predictions, task.model.predict(x))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in results.values():
        assert list(got) == list(want)


def test_bad_init():
    with pytest.raises(HEError):
        HEAction({"kind": "he"})


def test_secret_key_never_in_upload(lr_client):
    secret = lr_client.export_secret_key()
    blob = lr_client.eval_keys()
    assert secret[32:96] not in blob
    assert repr(lr_client._secret) == "SealSecretKey(<secret>)"
    assert unpack_eval_keys(blob).params_digest == lr_client.spec["params_digest"]


def test_unload_drops_the_keys_a_routing_key_names(he_store, lr_task):
    """The packer makes room by unloading `model@<key id prefix>`: those keys go, nothing else."""
    from veil.wire.he import routing_key, unload_value

    fresh = HEAction({"kind": "he", "store": str(he_store)})
    client = HEClient(fresh.run({"op": "spec", "model": "lr"})["spec"])
    fresh.run({"op": "upload_keys", "v": 1, "model": "lr", "keys": b64e(client.eval_keys())})
    assert fresh.run(unload_value(routing_key("mlp", client.key_id)))["dropped"] == 0  # other model
    assert fresh.run(unload_value("lr"))["dropped"] == 0  # a bare model id drops no keys
    assert fresh.run(unload_value(routing_key("lr", client.key_id)))["dropped"] == 1
    err = _err(fresh, {"op": "infer", **_request(client, lr_task.x_test[:1], "lr")})
    assert err.code == "unknown_key"
    assert _err(fresh, {"op": "unload", "model": 7}).code == "bad_request"


def test_key_cache_evicts_before_it_loads(he_store):
    """Loaded keys stay within the cache: the least recently used go first, before a new set
    is loaded (so an instance's peak is the cache plus one key set)."""
    fresh = HEAction({"kind": "he", "store": str(he_store), "key_cache_mb": 1})
    clients = [HEClient(fresh.run({"op": "spec", "model": "lr"})["spec"]) for _ in range(3)]
    for c in clients:
        fresh.run({"op": "upload_keys", "v": 1, "model": "lr", "keys": b64e(c.eval_keys())})
    assert len(fresh.keys) == 1  # each LR key set is ~0.6 MiB blob, ~2.4 MiB loaded: one at a time
    assert _err(fresh, {"op": "upload_keys", "v": 1, "model": "lr", "key_cache_mb": 0}).code == "bad_request"
