"""The action server passes OpenWhisk activation fields per request (never via os.environ, which
every request thread shares) and keeps its protocol: /init, /run, JSON errors, sentinels."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from veil.runtime.action_server import ActionServer, ActionState, Activation, current_activation, make_handler


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
    state = ActionState(threads=8, queue=8)
    state.action = RecordingAction()
    srv = ActionServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


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
