"""The action server passes OpenWhisk activation fields per request (never via os.environ, which
every request thread shares) and keeps its protocol: /init, /run, JSON errors, sentinels."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from runtime_support import action_server

from veil.errors import VeilError
from veil.runtime.action_server import (
    SENTINEL,
    ActionServer,
    ActionState,
    Activation,
    current_activation,
    make_handler,
    split_init_body,
)


class RecordingAction:
    """Answers with what it sees of its activation, after a pause so that calls overlap."""

    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        before = current_activation()
        time.sleep(float(value.get("sleep", 0)))
        after = current_activation()
        return {
            "before": before.__dict__ if before else None,
            "after": after.__dict__ if after else None,
            "env": sorted(k for k in os.environ if k.startswith("__OW_")),
        }


@pytest.fixture
def server() -> Iterator[str]:
    with action_server(RecordingAction(), threads=8, queue=8) as port:
        yield f"http://127.0.0.1:{port}"


def _activation(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "value": value,
        "activation_id": uuid.uuid4().hex,
        "transaction_id": uuid.uuid4().hex,
        "action_name": "/guest/veil-tee",
        "namespace": "guest",
        "deadline": str(int(time.time() * 1000) + 60_000),
        "api_host": "https://openwhisk.test",
    }


def test_activation_fields_are_per_request_and_never_in_the_environment(server):
    before_env = {k: v for k, v in os.environ.items() if k.startswith("__OW_")}
    bodies = [_activation({"sleep": 0.3}) for _ in range(6)]
    answers: list[dict[str, Any]] = [{}] * len(bodies)

    def call(i: int) -> None:
        answers[i] = httpx.post(f"{server}/run", json=bodies[i], timeout=10).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for body, answer in zip(bodies, answers, strict=True):
        want = {name: body.get(name) for name in Activation.__dataclass_fields__}
        assert answer["before"] == want == answer["after"], answer  # its own fields, throughout the call
        assert answer["env"] == sorted(before_env)
    assert {k: v for k, v in os.environ.items() if k.startswith("__OW_")} == before_env
    assert not any(v == body["activation_id"] for body in bodies for v in os.environ.values())


def test_no_activation_outside_a_call_and_none_fields_when_not_sent(server):
    assert current_activation() is None
    answer = httpx.post(f"{server}/run", json={"value": {}}, timeout=10).json()
    assert answer["before"] == Activation().__dict__


def _serve(state: ActionState) -> tuple[ActionServer, str]:
    srv = ActionServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _sentinels(text: str) -> int:
    return sum(1 for line in text.splitlines() if line == SENTINEL)


@pytest.mark.parametrize("http_error_status", [False, True], ids=["openwhisk-200", "http-status"])
def test_refused_runs_are_application_errors_with_their_end_markers(capfd, http_error_status):
    """A run refused before admission (busy) is answered like any failed activation: 200 with the
    status in the error (or the HTTP status, with VEIL_ERROR_STATUS=http), then both markers."""
    state = ActionState(threads=1, queue=0, http_error_status=http_error_status)
    state.action = RecordingAction()
    srv, url = _serve(state)
    try:
        capfd.readouterr()
        slow = threading.Thread(target=lambda: httpx.post(f"{url}/run", json={"value": {"sleep": 1.0}}, timeout=10))
        slow.start()
        time.sleep(0.3)
        busy = httpx.post(f"{url}/run", json={"value": {}}, timeout=10)
        slow.join(10)
        err = busy.json()["error"]
        assert (err["code"], err["status"]) == ("busy", 503), err
        assert busy.status_code == (503 if http_error_status else 200)
        # and a warm instance keeps serving
        assert httpx.post(f"{url}/run", json={"value": {}}, timeout=10).status_code == 200
        time.sleep(0.2)
        out, err_text = capfd.readouterr()
        assert _sentinels(out) == 3 and _sentinels(err_text) == 3
    finally:
        srv.shutdown()
        srv.server_close()


def test_openwhisk_init_bodies_are_split_into_init_value_and_settings():
    init = {"kind": "tee", "keyservice_url": "http://ks:8700", "store": "http://store:8900"}
    # Veil's platforms send the init value itself
    assert split_init_body(init) == (init, {})
    assert split_init_body({}) == (None, {})
    # OpenWhisk's invoker: blackbox without code, init parameters (strings) in env
    body = {
        "name": "veil-tee",
        "binary": False,
        "main": "main",
        "env": {
            "VEIL_INIT": json.dumps(init),
            "VEIL_SIM_ROOT": "/etc/veil/sim-root.key",
            "VEIL_THREADS": "8",
            "__OW_NAMESPACE": "guest",
            "__OW_ACTIVATION_ID": "a" * 32,
            "OTHER": "x",
        },
    }
    value, settings = split_init_body(body)
    assert value == init
    assert settings == {
        "VEIL_INIT": json.dumps(init),
        "VEIL_SIM_ROOT": "/etc/veil/sim-root.key",
        "VEIL_THREADS": "8",
    }
    # an init parameter given as a JSON object (the REST API allows any JSON value) is accepted
    assert split_init_body({"name": "f", "env": {"VEIL_INIT": init}})[0] == init
    # no VEIL_INIT: a container that was preinitialised from its own environment
    assert split_init_body({"name": "f", "main": "main", "binary": False, "code": ""}) == (None, {})
    for bad, code in (
        ({"name": "f", "env": {"VEIL_INIT": "{nope"}}, "bad_init"),
        ({"name": "f", "env": {"VEIL_INIT": "[1]"}}, "bad_init"),
        ({"name": "f", "env": "VEIL_INIT=1"}, "malformed"),
    ):
        with pytest.raises(VeilError) as info:
            split_init_body(bad)
        assert info.value.code == code, bad
