"""What the cloud controls cannot unlock, roll back or forge an owner's or a user's decision:
model versions, owner-only uploads, staged publishes and client-owned trust anchors, each
against a running deployment (KeyService subprocess, gateway, platform, runtime subprocesses)."""

from __future__ import annotations

import hashlib
import time

import httpx
import numpy as np
import pytest
from e2e_support import CLIENT_TIMEOUT_S, assert_matches_reference, wait_until

from veil.crypto import chunked
from veil.crypto.encoding import b64e
from veil.crypto.identity import HEADER_PRINCIPAL
from veil.crypto.keys import SymmetricKey
from veil.errors import VeilError
from veil.keyservice import wire
from veil.sdk import Deployment, ModelOwner
from veil.trust import TrustAnchors, TrustError

LR, MLP = "breast-cancer-lr", "digits-mlp"
DELAY_S = 2


def _store_file(stack, model_id: str, version: int):
    return stack.deployment.store_dir / "models" / model_id / f"v{version}.veilm"


def _served(stack, user, model, x) -> bool:
    try:
        assert_matches_reference(model, x, stack.infer(user, model.model_id.split("@")[0], x))
        return True
    except (VeilError, AssertionError):
        return False


# -- model versions ---------------------------------------------------------------------------------


def test_republished_model_is_served_within_the_delay(stack):
    """v1 is the LR; v2 (same id) is the MLP. Warm instances keep v1 only until the owner's
    delay runs out, then serve v2: no instance keeps an old version alive by traffic."""
    lr, mlp = stack.models[LR], stack.models[MLP]
    model_id = "republished"
    stack.publish(model_id, lr.onnx, revocation_delay_s=DELAY_S)
    stack.owner.grant(model_id, stack.user.id)
    stack.user.request_access(model_id)
    x_lr, x_mlp = lr.x_test[:2], mlp.x_test[:2]
    assert_matches_reference(lr, x_lr, stack.infer(stack.user, model_id, x_lr))
    published = time.monotonic()
    stack.publish(model_id, mlp.onnx, revocation_delay_s=DELAY_S)

    def v2_served() -> bool:
        try:
            out = stack.infer(stack.user, model_id, x_mlp)
        except VeilError as exc:
            assert exc.code == "bad_input", (exc.code, exc.message)  # v1 still cached: a 64-feature input
            stack.infer(stack.user, model_id, x_lr)  # keep v1 hot meanwhile
            return False
        assert_matches_reference(mlp, x_mlp, out)
        return True

    assert wait_until(v2_served, timeout=DELAY_S + 8, interval=0.1)
    # the old keys (and with them v1) expire after the delay; loading v2 takes what a cold load takes
    assert time.monotonic() - published <= DELAY_S + 5.0
    # old versions are garbage-collected: once v2 is current, publishing v3 removes v1's file
    assert stack.deployment.store_dir.joinpath("models", model_id, "v1.veilm").exists()
    stack.publish(model_id, mlp.onnx, revocation_delay_s=DELAY_S)
    kept = sorted(p.name for p in (stack.deployment.store_dir / "models" / model_id).iterdir())
    assert kept == ["v2.veilm", "v3.veilm"], kept


def test_older_sealed_file_under_the_same_key_is_refused(stack):
    """Rollback: the store serves v1's genuine sealed file (same model key!) where v2 belongs."""
    lr = stack.models[LR]
    model_id = "rolled-back"
    key = SymmetricKey.generate()
    stack.publish(model_id, lr.onnx, key=key, revocation_delay_s=DELAY_S)
    old_file = _store_file(stack, model_id, 1).read_bytes()
    stack.owner.grant(model_id, stack.user.id)
    stack.user.request_access(model_id)
    # v2 under the same key; the store swaps in v1's file before anyone loads v2
    owner = stack.owner
    version = owner.keyservice.stage_version(model_id, key, chunked.content_digest(key, lr.onnx + b"\0"))
    owner.upload_sealed(model_id, version, chunked.seal_bytes(key, lr.onnx + b"\0", model=model_id, version=version))
    _store_file(stack, model_id, version).write_bytes(old_file)
    owner.keyservice.commit_version(model_id, version)
    with pytest.raises(VeilError) as info:
        stack.infer(stack.user, model_id, lr.x_test[:1])
    assert info.value.code == "model_integrity" and "version" in info.value.message, info.value.message


def test_substituted_file_with_the_released_version_is_refused(stack):
    """Substitution: a file that claims the released version but another digest (the owner sealed
    two different models as 'v1' under one key; the store serves the one never staged)."""
    lr, mlp = stack.models[LR], stack.models[MLP]
    model_id = "substituted"
    key = SymmetricKey.generate()
    stack.publish(model_id, lr.onnx, key=key)
    stack.owner.grant(model_id, stack.user.id)
    stack.user.request_access(model_id)
    forged = chunked.seal_bytes(key, mlp.onnx, model=model_id, version=1)
    _store_file(stack, model_id, 1).write_bytes(forged)
    with pytest.raises(VeilError) as info:
        stack.infer(stack.user, model_id, lr.x_test[:1])
    assert info.value.code == "model_integrity" and "digest" in info.value.message, info.value.message


# -- who may write a model --------------------------------------------------------------------------


def _upload(stack, model_id: str, version: int, body: bytes, headers: dict) -> httpx.Response:
    with httpx.Client(base_url=stack.info.gateway_url, timeout=CLIENT_TIMEOUT_S) as client:
        return client.put(f"/v1/models/{model_id}/versions/{version}/sealed", content=body, headers=headers)


def test_only_the_owner_writes_a_model(stack):
    lr = stack.models[LR]
    current = _store_file(stack, LR, 1)
    before = current.read_bytes()
    # the owner stages v2 (not yet uploaded): the only version an upload may target
    key = SymmetricKey.generate()
    version = stack.owner.keyservice.stage_version(LR, key, chunked.content_digest(key, lr.onnx))
    sealed = chunked.seal_bytes(key, lr.onnx, model=LR, version=version)
    digest = hashlib.sha256(sealed).hexdigest()
    intruder = stack.new_owner()
    signed_by = {
        "anonymous": {},
        "intruder": {
            HEADER_PRINCIPAL: intruder.id,
            wire.HEADER_UPLOAD_SIGNATURE: b64e(intruder.identity.sign(wire.upload_payload(LR, version, digest))),
        },
        "intruder-as-owner": {
            HEADER_PRINCIPAL: stack.owner.id,
            wire.HEADER_UPLOAD_SIGNATURE: b64e(intruder.identity.sign(wire.upload_payload(LR, version, digest))),
        },
        "owner-signed-other-bytes": {
            HEADER_PRINCIPAL: stack.owner.id,
            wire.HEADER_UPLOAD_SIGNATURE: b64e(
                stack.owner.identity.sign(wire.upload_payload(LR, version, hashlib.sha256(b"x").hexdigest()))
            ),
        },
    }
    expected = {
        "anonymous": (401, "unsigned_upload"),
        "intruder": (403, "not_owner"),
        "intruder-as-owner": (403, "bad_upload_signature"),
        "owner-signed-other-bytes": (403, "bad_upload_signature"),
    }
    for who, headers in signed_by.items():
        r = _upload(stack, LR, version, sealed, headers)
        assert (r.status_code, r.json()["error"]["code"]) == expected[who], (who, r.text)
        assert not _store_file(stack, LR, version).exists(), who
    # nor may anyone, the owner included, overwrite the current version
    r = _upload(stack, LR, 1, sealed, signed_by["owner-signed-other-bytes"])
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_staged", r.text
    assert current.read_bytes() == before
    x = lr.x_test[:2]
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))
    leftovers = [p.name for p in current.parent.iterdir() if p.name.startswith(".upload-")]
    assert not leftovers, leftovers


def test_oversized_upload_is_refused_and_leaves_nothing(stack, serve_app, tmp_path):
    """A gateway with a 1 MiB limit, a chunked 3 MiB upload (no content-length to trust): 413,
    and no temporary file is left in the store."""
    from veil.gateway.app import create_app
    from veil.gateway.routing import DirectRouter
    from veil.store import LocalModelStore

    store = LocalModelStore(tmp_path / "store", create=True)
    app = create_app(
        DirectRouter(stack.platform, "unused"),
        store,
        keyservice_url=stack.info.keyservice_url,
        max_model_bytes=1 << 20,
    )
    url = serve_app(app)
    key = SymmetricKey.generate()
    version = stack.owner.keyservice.stage_version(LR, key, chunked.content_digest(key, b"big"))
    headers = {HEADER_PRINCIPAL: stack.owner.id, wire.HEADER_UPLOAD_SIGNATURE: b64e(b"\0" * 64)}

    def body():
        for _ in range(48):
            yield b"\0" * 65536

    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:
        r = client.put(f"/v1/models/{LR}/versions/{version}/sealed", content=body(), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*")), list((tmp_path / "store").rglob("*"))


def test_refused_publish_leaves_the_previous_version_serving(stack):
    lr = stack.models[LR]
    before = sorted(p.name for p in (stack.deployment.store_dir / "models" / LR).iterdir())
    intruder = stack.new_owner()
    with pytest.raises(VeilError) as info:  # not the owner
        intruder.publish(LR, stack.models[MLP].onnx)
    assert info.value.code == "not_owner"
    with pytest.raises(VeilError) as info:  # a malformed allow-list entry
        stack.owner.publish(LR, stack.models[MLP].onnx, allowed_measurements=["sgx:nonsense"])
    assert info.value.code == "malformed"
    with pytest.raises(VeilError) as info:  # a revocation delay beyond the measured cap
        stack.owner.publish(LR, stack.models[MLP].onnx, revocation_delay_s=wire.MAX_REVOCATION_DELAY_S + 1)
    assert info.value.code == "malformed"
    assert sorted(p.name for p in (stack.deployment.store_dir / "models" / LR).iterdir()) == before
    x = lr.x_test[:2]
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))


def test_failed_upload_leaves_the_previous_version_serving(stack):
    """Staged at the KeyService, but the upload fails: nothing becomes current."""
    lr = stack.models[LR]
    key = SymmetricKey.generate()
    version = stack.owner.keyservice.stage_version(LR, key, chunked.content_digest(key, stack.models[MLP].onnx))
    with pytest.raises(VeilError):
        stack.owner.upload_sealed(LR, version, b"VEILMDL1 not really a sealed model")
    with pytest.raises(VeilError) as info:  # and committing a version whose upload never landed is the
        stack.owner.keyservice.commit_version(LR, version + 1)  # owner's call only: unknown versions fail
    assert info.value.code == "unknown_version"
    x = lr.x_test[:2]
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))


# -- trust anchors belong to the clients ----------------------------------------------------------------


def _operator_file(stack, **settings) -> Deployment:
    return Deployment.from_json({**stack.info.to_json(), **settings})


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"keyservice_measurements": ["ee" * 32]}, "keyservice_measurements"),
        ({"runtime_measurements": ["ee" * 32]}, "runtime_measurements"),
        ({"allow_simulated": True}, "allow_simulated"),
        ({"sim_root": "ab" * 32}, "sim_root"),
    ],
    ids=["foreign-keyservice", "foreign-runtime", "allow-simulated", "foreign-sim-root"],
)
def test_operator_written_trust_settings_are_refused(stack, settings, field):
    """The operator's deployment.json names a KeyService, runtime, simulation switch or root the
    client did not choose: the client refuses before it talks to anything, naming the field."""
    strict = TrustAnchors(
        keyservice_measurements=stack.trust.keyservice_measurements,
        runtime_measurements=stack.trust.runtime_measurements,
    )
    anchors = strict if field == "allow_simulated" else stack.trust
    with pytest.raises(TrustError) as info:
        ModelOwner(_operator_file(stack, **settings), trust=anchors)
    assert field in info.value.message


def test_client_without_simulation_refuses_the_simulated_keyservice(stack):
    """Even when the operator says simulation is fine, a client that did not opt in refuses."""
    strict = TrustAnchors(
        keyservice_measurements=stack.trust.keyservice_measurements,
        runtime_measurements=stack.trust.runtime_measurements,
    )
    owner = ModelOwner(stack.info, trust=strict)
    try:
        with pytest.raises(VeilError) as info:
            owner.register()
        assert info.value.code == "keyservice_not_trusted" and info.value.field == "kind", info.value.message
        assert "simulation" in info.value.message
    finally:
        owner.close()


def test_fake_keyservice_gets_no_model(stack, serve_app, tmp_path):
    """A KeyService of another build (another measurement) behind the operator's address: the
    owner's own anchors refuse it before any key is sent, so it never decrypts the model."""
    from veil.keyservice.api import create_app
    from veil.keyservice.server import build_keyservice

    fake = build_keyservice(tmp_path / "fake", allow_simulated=True, measurement="ee" * 32)
    url = serve_app(create_app(fake))
    try:
        trust = TrustAnchors(
            keyservice_measurements=stack.trust.keyservice_measurements,
            runtime_measurements=stack.trust.runtime_measurements,
            allow_simulated=True,
            sim_roots=[*stack.trust.sim_roots, fake.trust.sim_roots[0]],
        )
        owner = ModelOwner(Deployment(stack.info.gateway_url, url), trust=trust)
        with pytest.raises(VeilError) as info:
            owner.publish("fake-target", stack.models[LR].onnx)
        assert "measurement" in info.value.message, info.value.message
        owner.close()
        assert fake.store.model("fake-target") is None
    finally:
        fake.store.close()


def test_decrypted_model_never_depends_on_operator_trust(stack):
    """Sanity: the shared stack's clients use their own anchors, and the deployment file the
    operator wrote has addresses only."""
    written = (stack.deployment.root / "deployment.json").read_text()
    for name in ("measurement", "allow_simulated", "sim_root"):
        assert name not in written
    assert np.isfinite(stack.models[LR].x_test).all()
