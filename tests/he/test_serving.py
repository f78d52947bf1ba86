"""HE and hybrid mode served like TEE mode, end to end through the real path: the SDK → the
gateway (uvicorn) → the packer → the local platform → `python -m veil.runtime` instances, with
models published by their owner through the gateway and evaluation keys kept in the model store."""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import numpy as np
import pytest

from veil.crypto.encoding import b64e
from veil.deployment import HE_FUNCTION
from veil.errors import VeilError
from veil.he.keys import store_id
from veil.he.user import encrypt_request, signed_request


def _plain(stack, name, x):
    return stack.tasks[name.split("-")[0]].model.predict(x)


@pytest.mark.parametrize("name", ["lr", "mlp", "lr-hybrid", "mlp-hybrid"])
def test_one_api_for_he_and_hybrid(he_stack, name):
    task = he_stack.tasks[name.split("-")[0]]
    x = task.x_test[:3]
    card = he_stack.user.card(name)
    assert card.mode == ("hybrid" if name.endswith("hybrid") else "he")
    out = he_stack.user.infer(name, x)
    assert list(out["predictions"]) == list(_plain(he_stack, name, x))
    compiled = he_stack.compiled[name.split("-")[0]]
    assert np.max(np.abs(out["scores"] - compiled.predict_plain(x))) < 1e-2 * max(1.0, np.abs(out["scores"]).max())


def test_both_packings_and_keys_reused(he_stack, tmp_path):
    """A second SDK process (same client directory) reuses the stored keys: same key id, no upload."""
    user = he_stack.user
    task = he_stack.tasks["lr"]
    for packing in ("latency", "throughput"):
        out = user.infer("lr", task.x_test, packing=packing)
        assert np.mean(out["predictions"] == task.model.predict(task.x_test)) >= 0.99
    spec = user.card("lr").extra["he_spec"]
    first = user.he_keys.for_model("lr", spec)
    directory = first.directory
    assert directory is not None and (directory / "secret.key").stat().st_mode & 0o077 == 0
    assert first.uploaded()
    from veil.he.user import HEKeyChain

    again = HEKeyChain(user.id, user.he_keys.key_dir).for_model("lr", spec)
    assert again.key_id == first.key_id and again.uploaded()
    secret = (directory / "secret.key").read_bytes()
    for log in (he_stack.deployment.log_dir).rglob("*"):
        if log.is_file():
            assert secret[32:96] not in log.read_bytes(), log


def test_concurrent_clients_on_four_instances(he_stack):
    """12 fresh users at once, 3 requests each over LR and MLP, the first of each user a
    throughput batch of three groups that the gateway spreads over instances: no failures and no
    `unknown_key` (an instance that lacks a user's keys fetches them from the store), several
    instances serving."""
    users = [he_stack.new_user(grant=("lr", "mlp")) for _ in range(12)]
    group = he_stack.user.card("lr").extra["throughput_group"]
    lr = he_stack.tasks["lr"]
    big = np.tile(lr.x_test, (2 * group // len(lr.x_test) + 2, 1))[: 2 * group + 10]
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(len(users))

    def work(i: int) -> None:
        barrier.wait(timeout=60)
        for r in range(3):
            name = "mlp" if (i + r) % 3 == 0 and r else "lr"
            task = he_stack.tasks[name]
            x = big if r == 0 else task.x_test[(i + r) % 20 : (i + r) % 20 + 2]
            try:
                out = users[i].infer(name, x, packing="throughput" if r == 0 else "latency", deadline_s=120)
                ok = np.mean(out["predictions"] == task.model.predict(x)) >= (0.99 if r == 0 else 1.0)
                with lock:
                    done[0] += 1
                    if not ok:
                        failures.append(f"user {i}: wrong predictions")
            except VeilError as exc:
                with lock:
                    failures.append(f"user {i}: {exc.code}: {exc.message}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert failures == [] and done[0] == 36
    served = [i for i in he_stack.deployment.he_platform.instances(HE_FUNCTION) if i.requests > 0]
    assert len(served) >= 2, served


def _raw(stack, user, name, x, packing=None, mutate=None):
    """A signed HE request built by hand (optionally altered before signing), and its answer."""
    keys = user.he_keys.for_model(name, user.card(name).extra["he_spec"])
    user._upload_he_keys(name, keys)
    req, _ = encrypt_request(name, keys, x, packing)
    body, headers = signed_request(user.identity, req, 60)
    if mutate is not None:
        obj = json.loads(body)
        mutate(obj)
        body = json.dumps(obj).encode()
        import hashlib

        from veil.he.user import signed_headers
        from veil.wire import he as he_wire

        headers = {
            **signed_headers(user.identity, he_wire.request_payload(name, hashlib.sha256(body).hexdigest())),
            "content-type": "application/json",
        }
    with httpx.Client(base_url=stack.info.gateway_url, timeout=120) as http:
        return http.post(f"/v1/he/models/{name}:infer", content=body, headers=headers), body, headers


def test_an_instance_without_the_keys_fetches_them(he_stack):
    """A request sent straight to a runtime instance started now, which never saw an upload (a
    function of its own on the deployment's platform, the HE function's spec), is served."""
    user = he_stack.user
    x = he_stack.tasks["lr"].x_test[:2]
    keys = user.he_keys.for_model("lr", user.card("lr").extra["he_spec"])
    user._upload_he_keys("lr", keys)
    req, batch = encrypt_request("lr", keys, x, "latency")
    platform = he_stack.deployment.he_platform
    spec = copy.deepcopy(he_stack.deployment.he_router.template)
    spec.name, spec.max_instances = "veil-he-fresh", 1
    platform.deploy(spec)
    try:
        fresh = platform.start_instance(spec.name)
        value = {**req.to_json(), "op": "infer", "version": user.card("lr").version, "user": user.id}
        answer = platform.invoke_instance(spec.name, fresh, value, timeout=60)
    finally:
        platform.remove(spec.name)
    from veil.he.user import decrypt_response

    assert list(decrypt_response(keys, answer, batch.packing, batch.batch)["predictions"]) == list(
        he_stack.tasks["lr"].model.predict(x)
    )


def test_key_ids_are_bound_to_their_principal(he_stack):
    owner_of_keys = he_stack.user
    other = he_stack.new_user(grant=("lr", "lr-hybrid"))
    x = he_stack.tasks["lr"].x_test[:1]
    theirs = owner_of_keys.he_keys.for_model("lr", owner_of_keys.card("lr").extra["he_spec"])
    owner_of_keys._upload_he_keys("lr", theirs)
    # another principal's request naming the first user's key id: refused, not evaluated
    r, _, _ = _raw(he_stack, other, "lr", x, "latency", mutate=lambda o: o.update(key_id=theirs.key_id))
    assert r.status_code == 403 and r.json()["error"]["code"] == "key_not_yours", r.text
    # nor can it re-upload those keys under its own name with the first user's id
    headers = {
        "x-veil-principal": other.id,
        "x-veil-he-signature": b64e(other.identity.sign(b"whatever")),
        "x-veil-he-key-id": theirs.key_id,
    }
    with httpx.Client(base_url=he_stack.info.gateway_url, timeout=60) as http:
        up = http.put("/v1/he/models/lr/keys", content=theirs.client.eval_keys(), headers=headers)
    assert up.status_code == 200 and up.json()["cached"]  # already stored: nothing written, nothing gained
    r, _, _ = _raw(he_stack, other, "lr", x, "latency", mutate=lambda o: o.update(key_id=theirs.key_id))
    assert r.json()["error"]["code"] == "key_not_yours"
    # hybrid: the runtime checks the record against the user the envelope authenticated
    hy = owner_of_keys.he_keys.for_model("lr-hybrid", owner_of_keys.card("lr-hybrid").extra["he_spec"])
    owner_of_keys._upload_he_keys("lr-hybrid", hy)
    other.request_access("lr-hybrid")
    req, _ = encrypt_request("lr-hybrid", hy, x, "latency")
    from veil.runtime import tensors

    payload = json.dumps(req.to_json()).encode()
    with pytest.raises(VeilError) as info:
        other._infer_once(
            "lr-hybrid",
            other.request_keys["lr-hybrid"],
            {tensors.HYBRID_REQUEST: np.frombuffer(payload, np.uint8)},
            timings=False,
            remaining_s=60,
        )
    assert info.value.code == "key_not_yours"


def test_he_requests_are_authenticated(he_stack):
    user = he_stack.user
    x = he_stack.tasks["lr"].x_test[:1]
    r, body, headers = _raw(he_stack, user, "lr", x, "latency")
    assert r.status_code == 200, r.text
    with httpx.Client(base_url=he_stack.info.gateway_url, timeout=60) as http:
        replay = http.post("/v1/he/models/lr:infer", content=body, headers=headers)
        assert replay.status_code == 409 and replay.json()["error"]["code"] == "replay"
        unsigned = http.post("/v1/he/models/lr:infer", content=body, headers={"content-type": "application/json"})
        assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "unsigned_request"
        forged = http.post("/v1/he/models/lr:infer", content=body[:-1] + b" }", headers=headers)
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "bad_signature"
    stranger = he_stack.new_user()
    with pytest.raises(VeilError) as info:
        stranger.infer("lr", x)
    assert info.value.code == "not_granted" and info.value.status == 403


def _refused_after(user, model, x, limit_s):
    """Seconds until `user` is refused `model` (not_granted), polling; fails past `limit_s`."""
    start = time.monotonic()
    while True:
        try:
            user.infer(model, x)
        except VeilError as exc:
            assert (exc.code, exc.status) == ("not_granted", 403), exc
            return time.monotonic() - start
        assert time.monotonic() - start <= limit_s, f"still served {limit_s} s after the revoke"
        time.sleep(0.05)


def test_a_revoked_user_is_refused_within_the_revocation_delay(he_stack):
    """The gateway keeps a user's grant for a few seconds (HE requests do not each ask the
    KeyService), never longer than the owner's revocation delay: after a revoke, the user is
    refused within it; with a delay of 0, at once."""
    owner, x = he_stack.owner, he_stack.tasks["lr"].x_test[:1]
    owner.publish("lr-revoke", he_stack.compiled["lr"], mode="he")
    owner.set_revocation_delay("lr-revoke", 2)
    user = he_stack.new_user(grant=("lr-revoke",))
    try:
        for _ in range(3):  # served, the grant now cached
            user.infer("lr-revoke", x)
        owner.revoke("lr-revoke", user.id)
        assert _refused_after(user, "lr-revoke", x, limit_s=2.5) <= 2.5
        owner.set_revocation_delay("lr-revoke", 0)
        time.sleep(2.1)  # what the gateway learnt under the 2 s delay has expired
        owner.grant("lr-revoke", user.id)
        user.infer("lr-revoke", x)
        owner.revoke("lr-revoke", user.id)
        with pytest.raises(VeilError) as info:  # no caching at all: the very next request
            user.infer("lr-revoke", x)
        assert info.value.code == "not_granted"
    finally:
        user.close()


@pytest.mark.parametrize(
    ("field", "value", "packing"),
    [
        ("batch", 10**400, "latency"),
        ("batch", 10**400, "throughput"),  # the gateway's splitter sees it first
        ("features", 10**400, "throughput"),
        ("batch", -1, "latency"),
        ("batch", "1", "latency"),
        ("key_id", "xyz", "latency"),
        ("packing", 3, "latency"),
    ],
)
def test_he_parsers_are_total(he_stack, field, value, packing):
    """Absurd fields are a 4xx that names the field, never an OverflowError or a 500."""
    lr = he_stack.tasks["lr"]
    x = np.tile(lr.x_test, (40, 1))[:4200] if packing == "throughput" else lr.x_test[:1]
    r, _, _ = _raw(he_stack, he_stack.user, "lr", x, packing, lambda o: o.update({field: value}))
    assert 400 <= r.status_code < 500, r.text[:300]
    err = r.json()["error"]
    assert field in err["message"], err


def test_throughput_batch_split_across_instances(he_stack):
    """A batch of three throughput groups runs as parts on several instances, reassembled in order."""
    user = he_stack.user
    task = he_stack.tasks["lr"]
    group = user.card("lr").extra["throughput_group"]
    reps = (2 * group + 50) // len(task.x_test) + 1
    x = np.tile(task.x_test, (reps, 1))[: 2 * group + 50]
    x = x * (1.0 + 0.01 * np.linspace(-1, 1, len(x)))[:, None]  # every row different: order matters
    r, _, _ = _raw(he_stack, user, "lr", x, "throughput")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["parts"] >= 2 and answer["batch"] == len(x)
    keys = user.he_keys.for_model("lr", user.card("lr").extra["he_spec"])
    from veil.he.user import decrypt_response

    got = decrypt_response(keys, answer, "throughput", len(x))
    assert np.mean(got["predictions"] == task.model.predict(x)) >= 0.99
    scores = he_stack.compiled["lr"].predict_plain(x)
    assert np.max(np.abs(got["scores"] - scores)) < 1e-2 * max(1.0, np.abs(scores).max())


def test_hybrid_model_never_reaches_the_cloud_in_clear(he_stack):
    """A hybrid model with weights no other model has: after publishing and serving it, neither
    the store, the logs nor the platform's files hold its weights (or its inputs)."""
    compiled = copy.deepcopy(he_stack.compiled["lr"])
    for layer in compiled.plan.layers:
        layer.affine.weight[...] = layer.affine.weight * 1.3717 + 1e-3
    he_stack.owner.publish("lr-secret", compiled, mode="hybrid")
    user = he_stack.new_user(grant=("lr-secret",))
    user.request_access("lr-secret")
    x = he_stack.tasks["lr"].x_test[:4] * 1.0123
    out = user.infer("lr-secret", x)
    assert np.max(np.abs(out["scores"] - compiled.predict_plain(x))) < 1e-2 * max(1.0, np.abs(out["scores"]).max())
    needles = {f"weights[{i}]": layer.affine.weight.tobytes() for i, layer in enumerate(compiled.plan.layers)}
    for i, layer in enumerate(compiled.plan.layers):
        w = layer.affine.weight.tobytes()
        needles[f"weights[{i}] slice"] = w[len(w) // 3 : len(w) // 3 + 64]
    needles["input"] = x.tobytes()
    needles["input row"] = x[0].tobytes()
    cloud = he_stack.deployment.cloud
    found = {}
    scanned = 0
    for f in cloud.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            scanned += 1
            for label, needle in needles.items():
                if needle in data:
                    found.setdefault(label, []).append(str(f))
    assert scanned > 5 and found == {}, found


def test_hybrid_runtime_with_a_measurement_not_allowed_gets_no_key(he_stack):
    compiled = he_stack.compiled["lr"]
    he_stack.owner.publish("lr-pinned", compiled, mode="hybrid", allowed_measurements=["ab" * 32])
    user = he_stack.new_user(grant=("lr-pinned",))
    user.request_access("lr-pinned")
    with pytest.raises(VeilError) as info:
        user.infer("lr-pinned", he_stack.tasks["lr"].x_test[:1])
    assert info.value.code == "measurement_refused_by_owner", info.value
    # the user's own allow-list counts too
    he_stack.owner.publish("lr-user-pinned", compiled, mode="hybrid")
    picky = he_stack.new_user(grant=("lr-user-pinned",))
    picky.request_access("lr-user-pinned", allowed_measurements=["cd" * 32])
    with pytest.raises(VeilError) as info:
        picky.infer("lr-user-pinned", he_stack.tasks["lr"].x_test[:1])
    assert info.value.code == "measurement_refused_by_user", info.value


def test_evaluation_key_records_in_the_store(he_stack):
    """Keys are stored under their id, as the record that names the user; a record altered in
    the store is refused by the instance that fetches it."""
    user = he_stack.user
    keys = user.he_keys.for_model("lr", user.card("lr").extra["he_spec"])
    user._upload_he_keys("lr", keys)
    store = he_stack.deployment.model_store()
    with store.open(store_id(keys.key_id), 1) as f:
        record = f.read()
    assert user.id.encode() in record[:400] and record.endswith(keys.client.eval_keys())
    from veil.he.errors import HEError
    from veil.he.keys import open_record

    with pytest.raises(HEError) as info:
        open_record(record[:-1] + bytes([record[-1] ^ 1]), keys.key_id, user.id, "lr")
    assert info.value.code == "key_integrity"


def test_reserved_model_ids(he_stack):
    with pytest.raises(VeilError) as info:
        he_stack.owner.publish("hek.mine", he_stack.compiled["lr"], mode="he")
    assert info.value.code == "reserved_model_id"


def test_body_limits_agree():
    """What the gateway admits, an instance's /run accepts; keys and models never pass /run."""
    from veil.gateway.app import MAX_ENVELOPE
    from veil.he.keys import MAX_KEY_BYTES
    from veil.runtime.action_server import MAX_BODY

    assert MAX_ENVELOPE + (1 << 20) < MAX_BODY  # + the few fields the gateway adds
    assert MAX_KEY_BYTES >= 100 << 20  # the 64-32-16-10 MLP's ~73 MiB keys fit


def test_large_keys_of_the_three_layer_mlp_are_served(he_stack):
    """The 64-32-16-10 MLP: ~73 MiB of evaluation keys, uploaded streamed once, served."""
    from veil.he.compile import compile_model
    from veil.he.tasks import digits_mlp3

    task = digits_mlp3()
    compiled = compile_model(task.model, task.x_train, name="mlp3")
    he_stack.owner.publish("mlp3", compiled, mode="he")
    user = he_stack.new_user(grant=("mlp3",))
    t0 = time.perf_counter()
    x = task.x_test[:2]
    out = user.infer("mlp3", x, packing="latency")
    keys = user.he_keys.for_model("mlp3", user.card("mlp3").extra["he_spec"])
    assert len(keys.client.eval_keys()) > 48 << 20  # more than the old runtime body limit
    assert list(out["predictions"]) == list(task.model.predict(x)), time.perf_counter() - t0


def _declared_too_large(base: str, path: str, headers: dict, size: int) -> tuple[int, dict]:
    """PUT that declares `size` bytes and sends none: refused from its headers alone."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("PUT", path)
        for k, v in {**headers, "content-length": str(size)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_key_upload_refusals(he_stack):
    """Key uploads: unsigned, over the limit, a key id that is not the blob's, a user without
    access; each a clear 4xx that leaves nothing in the store."""
    from veil.he.keys import record_key_id
    from veil.he.user import key_upload

    user = he_stack.new_user(grant=("lr",))
    keys = user.he_keys.for_model("lr", user.card("lr").extra["he_spec"])
    headers, pieces = key_upload(user.identity, "lr", keys)
    store = he_stack.deployment.model_store()
    with httpx.Client(base_url=he_stack.info.gateway_url, timeout=60) as http:
        r = http.put("/v1/he/models/lr/keys", content=b"x", headers={"content-type": "application/octet-stream"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unsigned_request"
        status, answer = _declared_too_large(he_stack.info.gateway_url, "/v1/he/models/lr/keys", headers, 300 << 20)
        assert status == 413 and answer["error"]["code"] == "too_large", answer
        wrong = record_key_id(user.id, "mlp", keys.client.eval_keys())
        r = http.put("/v1/he/models/lr/keys", content=pieces(), headers={**headers, "x-veil-he-key-id": wrong})
        assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"  # signed for the real id
        assert not store.exists(store_id(wrong), 1)
        stranger = he_stack.new_user()
        s_headers, s_pieces = key_upload(stranger.identity, "lr", stranger.he_keys.for_model("lr", keys.client.spec))
        r = http.put("/v1/he/models/lr/keys", content=s_pieces(), headers=s_headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_granted"
        assert not store.exists(store_id(s_headers["x-veil-he-key-id"]), 1)
        assert not store.exists(store_id(keys.key_id), 1)
        r = http.put("/v1/he/models/lr/keys", content=pieces(), headers=headers)
        assert r.status_code == 200 and r.json()["stored"] and store.exists(store_id(keys.key_id), 1)
        spec = http.get("/v1/he/models/lr/spec").json()
        assert spec["mode"] == "he" and spec["spec"]["params_digest"] == keys.client.spec["params_digest"]


def test_he_through_the_network_store(tmp_path, lr_task, lr_compiled):
    """With `veil store serve` as the store (what runtimes on other nodes read), HE models,
    hybrid models and evaluation-key records go through it; a record stored under another
    record's id is refused by the store service itself."""
    from veil.deployment import LocalDeployment, StackOptions
    from veil.sdk import ModelOwner, ModelUser

    deployment = LocalDeployment(tmp_path, StackOptions(max_instances=2, concurrency=2, serve_store=True))
    info = deployment.start()
    try:
        assert deployment.store_location.startswith("http://")
        trust = deployment.local_trust_anchors()
        owner = ModelOwner(info, trust=trust, timeout=120)
        owner.register()
        user = ModelUser(info, trust=trust, timeout=120)
        user.register()
        for name, mode in (("lr", "he"), ("lr-hybrid", "hybrid")):
            owner.publish(name, lr_compiled, mode=mode)
            owner.grant(name, user.id)
        user.request_access("lr-hybrid")
        x = lr_task.x_test[:3]
        for name in ("lr", "lr-hybrid"):
            assert list(user.infer(name, x)["predictions"]) == list(lr_task.model.predict(x))
        store = deployment.model_store()
        keys = user.he_keys.for_model("lr", user.card("lr").extra["he_spec"])
        assert store.exists(store_id(keys.key_id), 1)
        import io

        with store.open(store_id(keys.key_id), 1) as f:
            record = f.read()
        with pytest.raises(VeilError) as info_:
            store.put(store_id("0" * 64), 1, io.BytesIO(record))
        assert info_.value.code == "not_sealed"
        owner.close()
        user.close()
    finally:
        deployment.stop()


def test_a_new_version_is_served_and_clients_follow_it(he_stack, mlp_task):
    """Republishing an HE model (new weights, here even a new ring size) is a new owner-signed
    version; a client holding the old card follows it without being told."""
    from veil.he.compile import compile_model

    lr = he_stack.tasks["lr"]
    owner, user = he_stack.owner, he_stack.new_user()
    owner.publish("lr-versions", he_stack.compiled["lr"], mode="he")
    owner.grant("lr-versions", user.id)
    x = lr.x_test[:3]
    assert list(user.infer("lr-versions", x)["predictions"]) == list(lr.model.predict(x))
    v1 = user.card("lr-versions")
    bigger = compile_model(lr.model, lr.x_train, name="lr", poly_modulus_degree=4096)
    assert bigger.params_digest() != he_stack.compiled["lr"].params_digest()
    published = owner.publish("lr-versions", bigger, mode="he")
    assert published["version"] == v1.version + 1 and published["replaced_version"] == v1.version
    time.sleep(2.5)  # the gateway's card cache (2 s)
    out = user.infer("lr-versions", x)  # the SDK still holds v1's card
    assert list(out["predictions"]) == list(lr.model.predict(x))
    assert user.card("lr-versions").version == v1.version + 1
