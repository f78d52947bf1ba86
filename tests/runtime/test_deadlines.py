"""Work past its deadline is dropped, end to end: the runtime's action server refuses to start
an activation whose OpenWhisk `deadline` has passed (on arrival, or while it waited for one of
the instance's request threads), with a clean 504 `deadline_exceeded`; the action never runs.
And the platform hands the deadline down: what the runtime receives is the caller's time left.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from veil.platform.local import FunctionSpec, LocalPlatform
from veil.runtime.action_server import ActionServer, ActionState, make_handler


class CountingAction:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        self.ran.append(value.get("name", ""))
        time.sleep(float(value.get("sleep", 0)))
        return {"ok": True}


@pytest.fixture
def one_thread() -> Iterator[tuple[str, CountingAction]]:
    state = ActionState(threads=1, queue=8)
    action = CountingAction()
    state.action = action
    srv = ActionServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", action
    finally:
        srv.shutdown()
        srv.server_close()


def run(url: str, value: dict[str, Any], deadline_s: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"value": value}
    if deadline_s is not None:
        body["deadline"] = str(int((time.time() + deadline_s) * 1000))
    return httpx.post(f"{url}/run", content=json.dumps(body), timeout=10).json()


def test_passed_deadline_is_refused_before_running(one_thread) -> None:
    url, action = one_thread
    answer = run(url, {"name": "late"}, deadline_s=-1.0)
    assert answer["error"]["code"] == "deadline_exceeded" and answer["error"]["status"] == 504
    assert action.ran == []


def test_request_whose_deadline_passes_in_the_queue_is_dropped(one_thread) -> None:
    url, action = one_thread
    busy = threading.Thread(target=run, args=(url, {"name": "long", "sleep": 1.0}, 10.0))
    busy.start()
    time.sleep(0.2)  # the one request thread is taken
    t0 = time.monotonic()
    answer = run(url, {"name": "queued"}, deadline_s=0.3)
    waited = time.monotonic() - t0
    busy.join()
    assert answer["error"]["code"] == "deadline_exceeded"
    assert waited < 0.9  # answered at its deadline, not after the long request
    assert action.ran == ["long"]  # the dropped one never ran
    assert run(url, {"name": "fine"}, deadline_s=5.0) == {"ok": True}
    assert run(url, {"name": "none"}, deadline_s=None) == {"ok": True}  # no deadline: no limit


def test_malformed_deadline_is_a_clean_400(one_thread) -> None:
    url, action = one_thread
    r = httpx.post(f"{url}/run", content=json.dumps({"value": {}, "deadline": "soon"}), timeout=10).json()
    assert r["error"]["code"] == "malformed" and r["error"]["status"] == 400
    assert action.ran == []


def test_platform_sends_the_callers_time_left(tmp_path: Path) -> None:
    echo = [sys.executable, str(Path(__file__).parents[1] / "platform" / "echo_action.py")]
    with LocalPlatform(log_dir=tmp_path / "logs") as platform:
        platform.deploy(FunctionSpec("echo", echo, start_timeout_s=10))
        platform.invoke("echo", {}, timeout=10)  # started
        sent = time.time()
        answer = platform.invoke("echo", {}, timeout=3.0)
        deadline = int(answer["activation"]["deadline"]) / 1000
        assert sent + 2.5 <= deadline <= sent + 3.5
