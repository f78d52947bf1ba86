"""The gateway's handling of binary envelopes, per platform kind: a platform that declares
`binary_envelopes` (the local one) gets the body as it came; any other (Ray, or none declared)
gets the JSON form, so its values stay JSON. The router here records what the gateway hands the
platform and answers as that platform's runtime would."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from veil.crypto.envelope import BINARY_CONTENT_TYPE, Envelope, new_request_id, seal
from veil.crypto.keys import SymmetricKey
from veil.gateway.app import create_app
from veil.platform.local import LocalPlatform
from veil.platform.protocol import binary_envelopes
from veil.store import LocalModelStore

KEY = SymmetricKey(bytes(range(32)))


class Recording:
    """A router answering each request with a response envelope in the form it was given."""

    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []

    def invoke(self, model: str, value: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        self.values.append(value)
        given = value["envelope"]
        request = Envelope.from_binary(given) if isinstance(given, bytes) else Envelope.from_json(given)
        answer = seal(
            KEY,
            b"answer",
            model=request.model,
            user=request.user,
            request_id=request.request_id,
            direction="response",
            expires=request.expires,
        )
        return {"envelope": answer.to_binary() if isinstance(given, bytes) else answer.to_json()}


def _client(tmp_path: Path, platform: Any) -> tuple[TestClient, Recording]:
    router = Recording()
    store = LocalModelStore(tmp_path / "store", create=True)
    app = create_app(router, store, keyservice_url="http://127.0.0.1:9", platform=platform)
    return TestClient(app), router


def _request(model: str = "m") -> Envelope:
    return seal(
        KEY,
        b"x" * 5000,
        model=model,
        user="u",
        request_id=new_request_id(),
        direction="request",
        expires=int(time.time()) + 60,
    )


def _post(client: TestClient, body: bytes, model: str = "m"):
    return client.post(f"/v1/models/{model}:infer", content=body, headers={"content-type": BINARY_CONTENT_TYPE})


def test_the_local_platform_declares_binary_envelopes(tmp_path):
    with LocalPlatform(log_dir=tmp_path / "logs") as platform:
        assert binary_envelopes(platform)
    assert not binary_envelopes(object()) and not binary_envelopes(None)


def test_a_binary_platform_gets_the_body_as_it_came(tmp_path):
    with LocalPlatform(log_dir=tmp_path / "logs") as platform:
        client, router = _client(tmp_path, platform)
        env = _request()
        r = _post(client, env.to_binary())
    assert r.status_code == 200 and r.headers["content-type"] == BINARY_CONTENT_TYPE
    (value,) = router.values
    assert value == {"envelope": env.to_binary()} and type(value["envelope"]) is bytes
    assert Envelope.from_binary(r.content).request_id == env.request_id


def test_a_json_only_platform_gets_the_json_form_and_its_json_answer_passes(tmp_path):
    client, router = _client(tmp_path, None)
    env = _request()
    r = _post(client, env.to_binary())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    (value,) = router.values
    assert value == {"envelope": env.to_json()}
    assert Envelope.from_json(r.json()["envelope"]).request_id == env.request_id


def test_the_json_form_is_forwarded_as_json(tmp_path):
    with LocalPlatform(log_dir=tmp_path / "logs") as platform:
        client, router = _client(tmp_path, platform)
        env = _request()
        r = client.post("/v1/models/m:infer", json=env.to_json())
    assert r.status_code == 200 and r.json()["envelope"]["request_id"] == env.request_id
    assert router.values == [{"envelope": env.to_json()}]


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda b: b[:5], "envelope"),
        (lambda b: b + b"!", "envelope"),
        (lambda b: b[:-3], "ct"),
        (lambda b: b"JSON" + b[4:], "magic"),
        (lambda b: b[:30], "header"),
    ],
)
def test_mis_framed_bodies_never_reach_the_platform(tmp_path, damage, field):
    client, router = _client(tmp_path, None)
    r = _post(client, damage(_request().to_binary()))
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed"
    assert r.json()["error"]["message"].startswith(f"{field}:"), r.json()
    assert router.values == []


def test_the_url_must_name_the_header_model(tmp_path):
    client, router = _client(tmp_path, None)
    r = _post(client, _request("a").to_binary(), model="b")
    assert r.status_code == 400 and "'a'" in r.json()["error"]["message"] and router.values == []
