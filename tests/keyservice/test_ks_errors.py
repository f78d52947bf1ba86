"""Every KeyService endpoint validates its input and answers `{"error": {"code", "message"}}`."""

from __future__ import annotations

import json
import time

import pytest
from ks_helpers import RUNTIME, error_of, setup_model, signed

from veil.crypto.encoding import b64e
from veil.crypto.identity import Identity
from veil.errors import VeilError
from veil.keyservice import wire

SIGNED_ENDPOINTS = [
    ("POST", "/v1/models/iris/versions"),
    ("POST", "/v1/models/iris/versions/1/commit"),
    ("PUT", "/v1/models/iris/revocation-delay"),
    ("PUT", "/v1/models/iris/measurements"),
    ("PUT", "/v1/models/iris/grants/{user}"),
    ("DELETE", "/v1/models/iris/grants/{user}"),
    ("PUT", "/v1/models/iris/request-key"),
    ("DELETE", "/v1/models/iris/request-key"),
]


@pytest.fixture
def world(keyservice_server):
    m = setup_model(keyservice_server)
    return keyservice_server, m, keyservice_server.http()


@pytest.mark.parametrize(("method", "template"), SIGNED_ENDPOINTS)
def test_signed_endpoints_refuse_bad_authentication(world, method: str, template: str) -> None:
    ks, m, http = world
    path = template.format(user=m.user.identity.id)
    owner = m.owner.identity
    body = json.dumps({"v": 1}).encode()
    # no headers at all
    assert error_of(http.request(method, path, content=body)) == (401, "bad_signature_headers")
    # signed by someone else's key under the owner's id
    forged = Identity.generate().sign_request(method, path, body).as_dict()
    forged["x-veil-principal"] = owner.id
    assert error_of(http.request(method, path, content=body, headers=forged)) == (401, "bad_signature")
    # timestamp outside ±300 s, either way
    for skew in (-wire.CLOCK_SKEW_S - 5, wire.CLOCK_SKEW_S + 5):
        answer = signed(http, owner, method, path, body=body, timestamp=int(time.time()) + skew)
        assert error_of(answer) == (401, "stale_timestamp")
    # an unregistered principal
    assert error_of(signed(http, Identity.generate(), method, path, body=body)) == (401, "unknown_principal")
    # replay: the same signed request twice (the first may fail on content, but its sequence
    # number is recorded once authenticated)
    seq = time.time_ns() // 1000 + 10_000_000
    signed(http, owner, method, path, body=body, seq=seq)
    assert error_of(signed(http, owner, method, path, body=body, seq=seq)) == (401, "stale_sequence")
    # held back: a request signed earlier (lower number) and delivered after a later one
    assert error_of(signed(http, owner, method, path, body=body, seq=seq - 1)) == (401, "stale_sequence")


@pytest.mark.parametrize(("method", "template"), SIGNED_ENDPOINTS)
def test_signed_endpoints_refuse_malformed_bodies(world, method: str, template: str) -> None:
    ks, m, http = world
    path = template.format(user=m.user.identity.id)
    owner = m.owner.identity
    assert error_of(signed(http, owner, method, path, body=b"{not json")) == (400, "malformed")
    assert error_of(signed(http, owner, method, path, body=b"[1, 2]")) == (400, "malformed")
    for v in (2, True, "1"):
        answer = signed(http, owner, method, path, body=json.dumps({"v": v}).encode())
        assert error_of(answer) == (400, "malformed") and "v:" in answer.json()["error"]["message"]
    huge = b'{"v": 1, "pad": "' + b"a" * (wire.MAX_BODY + 1) + b'"}'
    assert error_of(signed(http, owner, method, path, body=huge)) == (413, "too_large")


DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("path", "field", "obj"),
    [
        ("/v1/models/iris/versions", "sealed_model_key", {"sealed_model_key": "not*base64", "digest": DIGEST}),
        ("/v1/models/iris/versions", "sealed_model_key", {"digest": DIGEST}),
        ("/v1/models/iris/versions", "digest", {"sealed_model_key": "AAAA", "digest": "xyz"}),
        ("/v1/models/iris/versions", "measurements", {"sealed_model_key": "AAAA", "measurements": "x"}),
        ("/v1/models/iris/versions", "revocation_delay_s", {"sealed_model_key": "AAAA", "revocation_delay_s": 3600}),
        ("/v1/models/iris/revocation-delay", "revocation_delay_s", {"revocation_delay_s": -1}),
        ("/v1/models/iris/revocation-delay", "revocation_delay_s", {"revocation_delay_s": 1.5}),
        ("/v1/models/iris/measurements", "measurements", {"measurements": [1, 2]}),
        ("/v1/models/iris/measurements", "measurements", {"measurements": ["a"] * 65}),
        ("/v1/models/iris/measurements", "measurements", {"measurements": ["not-hex"]}),
        ("/v1/models/iris/request-key", "sealed_request_key", {"sealed_request_key": "A", "measurements": []}),
        ("/v1/models/iris/request-key", "measurements", {"sealed_request_key": "AAAA"}),
        (
            "/v1/models/iris/request-key",
            "max_revocation_delay_s",
            {"sealed_request_key": "AAAA", "measurements": [], "max_revocation_delay_s": 301},
        ),
    ],
)
def test_bad_fields_are_named(world, path: str, field: str, obj: dict) -> None:
    ks, m, http = world
    ident = m.owner.identity if "request-key" not in path else m.user.identity
    answer = signed(http, ident, "POST" if path.endswith("/versions") else "PUT", path, obj)
    assert error_of(answer) == (400, "malformed")
    assert answer.json()["error"]["message"].startswith(field)


def test_keys_that_do_not_open_are_refused(world) -> None:
    """A key sealed for another model, principal or purpose does not open at the KeyService."""
    ks, m, http = world
    from veil.crypto import hpke

    pk = ks.service.keypair.public_key
    aad = wire.upload_aad("other", m.owner.identity.id)
    wrong_model = hpke.seal(pk, b"k" * 32, info=wire.INFO_MODEL_KEY_UPLOAD, aad=aad)
    stage = "/v1/models/iris/versions"
    answer = signed(http, m.owner.identity, "POST", stage, {"sealed_model_key": b64e(wrong_model), "digest": DIGEST})
    assert error_of(answer) == (400, "integrity")
    as_request_key = hpke.seal(
        pk, b"k" * 32, info=wire.INFO_REQUEST_KEY_UPLOAD, aad=wire.upload_aad("iris", m.owner.identity.id)
    )
    answer = signed(http, m.owner.identity, "POST", stage, {"sealed_model_key": b64e(as_request_key), "digest": DIGEST})
    assert error_of(answer) == (400, "integrity")
    short = hpke.seal(pk, b"k" * 16, info=wire.INFO_MODEL_KEY_UPLOAD, aad=wire.upload_aad("iris", m.owner.identity.id))
    answer = signed(http, m.owner.identity, "POST", stage, {"sealed_model_key": b64e(short), "digest": DIGEST})
    assert error_of(answer) == (400, "malformed")


def test_unknown_model_and_principal(world) -> None:
    ks, m, http = world
    owner = m.owner.identity
    assert error_of(signed(http, owner, "PUT", "/v1/models/nope/measurements", {"measurements": []})) == (
        404,
        "unknown_model",
    )
    assert error_of(signed(http, owner, "PUT", "/v1/models/iris/grants/" + "cd" * 32)) == (404, "unknown_principal")
    assert error_of(signed(http, owner, "PUT", "/v1/models/bad%20id/grants/x")) == (400, "malformed")


def test_registration_errors(keyservice_server) -> None:
    http = keyservice_server.http()
    ident = Identity.generate()
    other = Identity.generate()
    wrong = signed(http, ident, "POST", "/v1/principals", {"public_key": b64e(other.public_key)})
    assert error_of(wrong) == (401, "bad_principal")
    short = signed(http, ident, "POST", "/v1/principals", {"public_key": b64e(b"x" * 31)})
    assert error_of(short) == (400, "malformed")
    unsigned = http.post("/v1/principals", json={"v": 1, "public_key": b64e(ident.public_key)})
    assert error_of(unsigned) == (401, "bad_signature_headers")


def test_runtime_endpoints_validate_input(world) -> None:
    ks, m, http = world
    assert error_of(http.post("/v1/attest", content=b"nope")) == (400, "malformed")
    good = {"v": 1, "challenge": "AAAA", "public_key": b64e(b"k" * 32), "evidence": {}}
    assert error_of(http.post("/v1/attest", json={**good, "challenge": "**"})) == (400, "malformed")
    assert error_of(http.post("/v1/attest", json={**good, "evidence": {"v": 1, "kind": "x"}})) == (400, "malformed")
    ev = {"v": 1, "kind": "sim", "raw": "AAAA", "report_data": ""}
    assert error_of(http.post("/v1/attest", json={**good, "evidence": ev})) == (401, "bad_challenge")
    assert error_of(http.post("/v1/release", json={"v": 1, "session": "short", "model": "iris", "user": "u"})) == (
        400,
        "malformed",
    )
    bad_model = {"v": 1, "session": "00" * 32, "model": "../x", "user": "u"}
    assert error_of(http.post("/v1/release", json=bad_model)) == (400, "malformed")
    assert error_of(http.post("/v1/release", content=b"x" * (wire.MAX_BODY + 10))) == (413, "too_large")
    assert error_of(http.get("/v1/evidence", params={"nonce": "AA"})) == (400, "malformed")
    assert error_of(http.get("/v1/evidence")) == (400, "malformed")
    assert error_of(http.get("/v1/nothing-here")) == (404, "not_found")
    assert m.user.identity.id and RUNTIME


def test_every_refused_attestation_is_audited_and_clean(world) -> None:
    """Evidence that trips the verifier in unusual ways (a JSON list where the claims belong, a
    signature over a non-object, garbage) is a 4xx naming the field, and each refusal is audited."""
    from veil.crypto.encoding import canonical_json

    ks, m, http = world
    root = ks.sim_root
    list_body = canonical_json([1, 2, 3])
    variants = {
        "claims-list": canonical_json({"body": b64e(list_body), "sig": b64e(root.sign(list_body))}),
        "outer-list": b"[]",
        "not-json": b"\xff\xfe",
    }
    before = len(ks.service.store.audit_entries())
    for name, raw in variants.items():
        challenge = http.post("/v1/attest/challenge").json()["challenge"]
        evidence = {"v": 1, "kind": "sim", "raw": b64e(raw), "report_data": ""}
        body = {"v": 1, "challenge": challenge, "public_key": b64e(b"k" * 32), "evidence": evidence}
        answer = http.post("/v1/attest", json=body)
        assert 400 <= answer.status_code < 500, (name, answer.text)
        assert error_of(answer)[1] in ("attestation_failed", "attestation_refused", "malformed"), name
    entries = [json.loads(e[1]) for e in ks.service.store.audit_entries()[before:]]
    refused = [e for e in entries if e.get("action") == "attest" and e.get("outcome") == "refused"]
    assert len(refused) == len(variants), entries
    assert all(len(e["reason"]) <= 500 for e in refused)


def test_a_verifier_bug_is_still_an_audited_refusal(world, monkeypatch) -> None:
    """Defence in depth: if a verifier raised something unexpected, the KeyService still refuses
    with a clean 403 and audits it (the verifier is replaced here only to make it raise)."""
    from veil.keyservice import service

    ks, m, http = world

    def broken_verify(*args, **kwargs):
        raise ZeroDivisionError("verifier bug")

    monkeypatch.setattr(service, "verify", broken_verify)
    challenge = http.post("/v1/attest/challenge").json()["challenge"]
    from veil.attest.sim import SimProvider

    evidence = SimProvider(ks.sim_root, RUNTIME).get_evidence(b"\0" * 32).to_json()
    body = {"v": 1, "challenge": challenge, "public_key": b64e(b"k" * 32), "evidence": evidence}
    answer = http.post("/v1/attest", json=body)
    assert error_of(answer) == (403, "attestation_failed")
    last = json.loads(ks.service.store.audit_entries()[-1][1])
    assert (last["action"], last["outcome"]) == ("attest", "refused")
    assert "ZeroDivisionError" in last["reason"]


def test_challenge_flood_fills_nothing_and_attestation_still_works(world) -> None:
    """20,000 unauthenticated challenge requests (the old table held 10,000) leave the KeyService
    state unchanged, and a runtime with valid evidence attests at once; forged, expired and
    reused challenges are refused."""
    from veil.keyservice.service import KeyService

    ks, m, http = world
    service: KeyService = ks.service
    for _ in range(20_000):
        service.challenge()
    assert service._used_challenges == {}
    runtime = ks.runtime(RUNTIME)
    assert runtime.attest() and runtime.release("iris", m.user.identity.id).model_key == m.model_key
    good = service.challenge()
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), (1).to_bytes(6, "big") + good[6:], b"\0" * 32, b"short"):
        with pytest.raises(VeilError) as info:
            service._check_challenge(bad)
        assert info.value.code == "bad_challenge"
    from veil.attest.sim import SimProvider
    from veil.crypto import hpke

    challenge = service.challenge()
    pk = hpke.HpkeKeyPair.generate().public_key
    evidence = SimProvider(ks.sim_root, RUNTIME).get_evidence(wire.runtime_binding(pk, challenge))
    service.attest(challenge, pk, evidence)
    with pytest.raises(VeilError) as info:  # the same challenge and evidence again
        service.attest(challenge, pk, evidence)
    assert info.value.code == "bad_challenge"
