"""The owner → user → runtime flow over real HTTP, and a negative test for each release rule."""

from __future__ import annotations

import json

import pytest
from ks_helpers import OTHER, RUNTIME, _keys, error_of, setup_model, signed

from veil.attest.evidence import Evidence
from veil.attest.sim import SimProvider, SimRoot
from veil.crypto import hpke
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.envelope import new_request_id, open_envelope, seal
from veil.crypto.keys import SymmetricKey
from veil.errors import VeilError
from veil.keyservice import wire


def audit_actions(ks) -> list[dict]:
    return [json.loads(e) for _, e, _, _ in ks.service.store.audit_entries()]


def test_full_owner_user_runtime_flow(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    runtime = ks.runtime(RUNTIME)
    released = runtime.release("iris", m.user.identity.id)
    model_key, request_key = released.model_key, released.request_key
    assert model_key == m.model_key and request_key == m.request_key
    # The attested session is reused: a second release does not attest again.
    assert _keys(runtime.release("iris", m.user.identity.id)) == (m.model_key, m.request_key)
    actions = audit_actions(ks)
    assert [a["action"] for a in actions].count("attest") == 1
    releases = [a for a in actions if a["action"] == "release"]
    assert len(releases) == 2 and all(a["outcome"] == "allowed" and a["measurement"] == RUNTIME for a in releases)
    # The released request key really is the user's: a user's envelope opens in the runtime.
    rid = new_request_id()
    env = seal(m.request_key, b"x", model="iris", user=m.user.identity.id, request_id=rid, direction="request")
    assert open_envelope(request_key, env, model="iris", user=m.user.identity.id, direction="request") == b"x"


def refusal(runtime, model: str, user: str) -> tuple[int, str]:
    with pytest.raises(VeilError) as exc:
        runtime.release(model, user)
    return exc.value.status, exc.value.code


def test_wrong_measurement_is_refused(keyservice_server) -> None:
    m = setup_model(keyservice_server)
    assert refusal(keyservice_server.runtime(OTHER), "iris", m.user.identity.id) == (
        403,
        "measurement_refused_by_owner",
    )
    last = audit_actions(keyservice_server)[-1]
    assert (last["action"], last["outcome"], last["measurement"]) == ("release", "refused", OTHER)


def test_measurement_allowed_by_owner_but_not_by_user(keyservice_server) -> None:
    m = setup_model(keyservice_server, owner_measurements=[RUNTIME, OTHER], user_measurements=[RUNTIME])
    assert refusal(keyservice_server.runtime(OTHER), "iris", m.user.identity.id) == (403, "measurement_refused_by_user")
    assert keyservice_server.runtime(RUNTIME).release("iris", m.user.identity.id).request_key == m.request_key


def test_ungranted_user_is_refused(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    stranger = ks.principal()
    stranger.put_request_key("iris", m.request_key, [RUNTIME])
    assert refusal(ks.runtime(RUNTIME), "iris", stranger.identity.id) == (403, "not_granted")
    assert refusal(ks.runtime(RUNTIME), "iris", "nobody") == (403, "not_granted")
    assert refusal(ks.runtime(RUNTIME), "unknown-model", m.user.identity.id) == (404, "unknown_model")


def test_revoked_user_is_refused_and_regrant_restores(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    runtime = ks.runtime(RUNTIME)
    runtime.release("iris", m.user.identity.id)
    m.owner.revoke("iris", m.user.identity.id)
    assert refusal(runtime, "iris", m.user.identity.id) == (403, "not_granted")
    m.owner.grant("iris", m.user.identity.id)
    assert runtime.release("iris", m.user.identity.id).model_key == m.model_key


def test_user_without_request_key_and_deleted_request_key(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    m.user.delete_request_key("iris")
    assert refusal(ks.runtime(RUNTIME), "iris", m.user.identity.id) == (403, "no_request_key")
    with pytest.raises(VeilError) as exc:
        m.user.delete_request_key("iris")
    assert (exc.value.status, exc.value.code) == (404, "no_request_key")


def test_owner_measurement_update_takes_effect(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks, user_measurements=[RUNTIME, OTHER])
    runtime = ks.runtime(OTHER)
    assert refusal(runtime, "iris", m.user.identity.id)[1] == "measurement_refused_by_owner"
    m.owner.set_measurements("iris", [OTHER])
    assert runtime.release("iris", m.user.identity.id).model_key == m.model_key
    assert refusal(ks.runtime(RUNTIME), "iris", m.user.identity.id)[1] == "measurement_refused_by_owner"


def test_non_owner_cannot_change_a_model(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    intruder = ks.principal()
    for change in (
        lambda: intruder.put_model_key("iris", m.model_key, [OTHER]),
        lambda: intruder.set_measurements("iris", [OTHER]),
        lambda: intruder.grant("iris", intruder.identity.id),
        lambda: intruder.revoke("iris", m.user.identity.id),
    ):
        with pytest.raises(VeilError) as exc:
            change()
        assert (exc.value.status, exc.value.code) == (403, "not_owner")
    # Nothing changed: the user still gets the owner's key under the owner's policy.
    assert ks.runtime(RUNTIME).release("iris", m.user.identity.id).model_key == m.model_key


def test_replayed_signed_request_is_refused(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    http = ks.http()
    path = f"/v1/models/iris/grants/{m.user.identity.id}"
    body = b""
    headers = m.owner.identity.sign_request("DELETE", path, body).as_dict()
    first = http.request("DELETE", path, content=body, headers=headers)
    assert first.status_code == 200
    m.owner.grant("iris", m.user.identity.id)
    replay = http.request("DELETE", path, content=body, headers=headers)
    assert error_of(replay) == (401, "stale_sequence")
    # the replay revoked nothing
    assert ks.runtime(RUNTIME).release("iris", m.user.identity.id).model_key == m.model_key


def test_signature_bound_to_path_and_body(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    http = ks.http()
    headers = m.owner.identity.sign_request("PUT", f"/v1/models/iris/grants/{m.user.identity.id}", b"").as_dict()
    moved = http.put(f"/v1/models/other/grants/{m.user.identity.id}", headers=headers)
    assert error_of(moved) == (401, "bad_signature")
    body = json.dumps({"v": 1, "measurements": [OTHER]}).encode()
    headers = m.owner.identity.sign_request("PUT", "/v1/models/iris/measurements", body).as_dict()
    swapped = json.dumps({"v": 1, "measurements": [RUNTIME, OTHER]}).encode()
    assert error_of(http.put("/v1/models/iris/measurements", content=swapped, headers=headers)) == (
        401,
        "bad_signature",
    )


def _attest_raw(ks, evidence_json: dict, public_key: bytes, challenge: bytes):
    body = {"v": 1, "challenge": b64e(challenge), "public_key": b64e(public_key), "evidence": evidence_json}
    return ks.http().post("/v1/attest", json=body)


def _challenge(ks) -> bytes:
    return b64d(ks.http().post("/v1/attest/challenge").json()["challenge"])


def test_tampered_evidence_is_refused(keyservice_server) -> None:
    ks = keyservice_server
    pair = hpke.HpkeKeyPair.generate()
    provider = SimProvider(ks.sim_root, OTHER)
    challenge = _challenge(ks)
    evidence = provider.get_evidence(wire.runtime_binding(pair.public_key, challenge))
    outer = json.loads(evidence.raw)
    claims = json.loads(b64d(outer["body"]))
    claims["measurement"] = RUNTIME  # claim the good measurement, keep the old signature
    forged_raw = canonical_json({"body": b64e(canonical_json(claims)), "sig": outer["sig"]})
    forged = Evidence(kind="sim", raw=forged_raw, report_data=evidence.report_data)
    assert error_of(_attest_raw(ks, forged.to_json(), pair.public_key, challenge)) == (403, "attestation_failed")
    last = [json.loads(e) for _, e, _, _ in ks.service.store.audit_entries()][-1]
    assert (last["action"], last["outcome"]) == ("attest", "refused") and "sim.sig" in last["reason"]
    # A challenge is used up by the first evidence that verifies (failures cannot burn it for the
    # genuine runtime, and need no state): the genuine evidence opens a session once, not twice.
    genuine = evidence.to_json()
    assert _attest_raw(ks, genuine, pair.public_key, challenge).status_code == 200
    assert error_of(_attest_raw(ks, genuine, pair.public_key, challenge)) == (401, "bad_challenge")


def test_evidence_from_untrusted_root_or_for_another_key_is_refused(keyservice_server) -> None:
    ks = keyservice_server
    pair = hpke.HpkeKeyPair.generate()
    challenge = _challenge(ks)
    rogue = SimProvider(SimRoot.generate(), RUNTIME).get_evidence(wire.runtime_binding(pair.public_key, challenge))
    assert error_of(_attest_raw(ks, rogue.to_json(), pair.public_key, challenge)) == (403, "attestation_failed")
    challenge = _challenge(ks)
    other_key = hpke.HpkeKeyPair.generate().public_key
    bound_elsewhere = SimProvider(ks.sim_root, RUNTIME).get_evidence(wire.runtime_binding(other_key, challenge))
    assert error_of(_attest_raw(ks, bound_elsewhere.to_json(), pair.public_key, challenge)) == (
        403,
        "attestation_refused",
    )
    challenge = _challenge(ks)
    debug = SimProvider(ks.sim_root, RUNTIME, debug=True).get_evidence(wire.runtime_binding(pair.public_key, challenge))
    status, code = error_of(_attest_raw(ks, debug.to_json(), pair.public_key, challenge))
    assert (status, code) == (403, "attestation_refused")


def test_simulated_evidence_refused_where_not_allowed(keyservice_server, serve_app) -> None:
    """A KeyService whose policy disallows simulation refuses sim evidence even from a known root."""
    import httpx

    from veil.attest.validate import Policy
    from veil.keyservice.api import create_app
    from veil.keyservice.service import KeyService

    ks = keyservice_server
    strict = KeyService(ks.service.store, ks.service.provider, ks.trust(), Policy(allow_simulated=False))
    url = serve_app(create_app(strict))
    pair = hpke.HpkeKeyPair.generate()
    with httpx.Client(base_url=url) as http:
        challenge = b64d(http.post("/v1/attest/challenge").json()["challenge"])
        ev = SimProvider(ks.sim_root, RUNTIME).get_evidence(wire.runtime_binding(pair.public_key, challenge))
        body = {"v": 1, "challenge": b64e(challenge), "public_key": b64e(pair.public_key), "evidence": ev.to_json()}
        answer = http.post("/v1/attest", json=body)
    assert error_of(answer) == (403, "attestation_refused")
    assert "simulated attestation is not allowed" in answer.json()["error"]["message"]


def test_unknown_session_is_refused(keyservice_server) -> None:
    m = setup_model(keyservice_server)
    answer = keyservice_server.http().post(
        "/v1/release", json={"v": 1, "session": "00" * 32, "model": "iris", "user": m.user.identity.id}
    )
    assert error_of(answer) == (401, "no_session")


def test_principal_client_refuses_keyservice_with_unexpected_measurement(keyservice_server) -> None:
    from veil.crypto.identity import Identity
    from veil.keyservice.client import KeyServiceNotTrusted, PrincipalClient

    client = PrincipalClient(
        keyservice_server.url,
        Identity.generate(),
        expected_measurements={OTHER},
        trust=keyservice_server.trust(),
        allow_simulated=True,
    )
    keyservice_server.clients.append(client)
    with pytest.raises(KeyServiceNotTrusted) as exc:
        client.connect()
    assert exc.value.field == "measurement" and exc.value.code == "keyservice_not_trusted"


def test_user_needs_registration_and_registered_model(keyservice_server) -> None:
    ks = keyservice_server
    unregistered = ks.principal(register=False)
    with pytest.raises(VeilError) as exc:
        unregistered.put_model_key("m2", SymmetricKey.generate())
    assert (exc.value.status, exc.value.code) == (401, "unknown_principal")
    user = ks.principal()
    with pytest.raises(VeilError) as exc:
        user.put_request_key("no-such-model", SymmetricKey.generate(), [RUNTIME])
    assert (exc.value.status, exc.value.code) == (404, "unknown_model")
    owner = ks.principal()
    owner.put_model_key("m3", SymmetricKey.generate(), [RUNTIME])
    with pytest.raises(VeilError) as exc:
        owner.grant("m3", "ab" * 32)
    assert (exc.value.status, exc.value.code) == (404, "unknown_principal")
    # A registration is idempotent and reported as such.
    http = ks.http()
    answer = signed(http, user.identity, "POST", "/v1/principals", {"public_key": b64e(user.identity.public_key)})
    assert answer.json() == {"v": 1, "id": user.identity.id, "created": False}
