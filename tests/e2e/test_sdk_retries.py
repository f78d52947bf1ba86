"""The SDK's retries and deadlines, through a real relay in front of the real gateway: clean
refusals that did not run (`busy`, `unavailable`) are retried with a fresh envelope, honouring
`Retry-After`; a failure after which the request may have run is retried only when the caller
marks it idempotent; nothing outlives the deadline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from e2e_support import assert_matches_reference

from veil.crypto.envelope import Envelope, is_binary
from veil.errors import VeilError
from veil.sdk import ModelUser

LR = "breast-cancer-lr"


@dataclass
class Relay:
    upstream: str
    script: list[tuple[int, str]] = field(default_factory=list)  # answers to give before forwarding
    always: tuple[int, str] | None = None
    seen: list[dict] = field(default_factory=list)
    timeouts: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def relay(stack) -> Iterator[Relay]:
    r = Relay(stack.info.gateway_url)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return

        def do_GET(self) -> None:  # model cards and the like pass straight through
            answer = httpx.get(r.upstream + self.path)
            self.send_response(answer.status_code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            content_type = self.headers.get("content-type", "application/json")
            # the envelope's clear fields, whichever form the SDK sent
            r.seen.append(json.loads(Envelope.from_binary(body).aad()) if is_binary(content_type) else json.loads(body))
            r.timeouts.append(self.headers.get("x-veil-timeout-ms", ""))
            canned = r.script.pop(0) if r.script else r.always
            if canned is None:
                answer = httpx.post(r.upstream + self.path, content=body, headers={"content-type": content_type})
                status, out, extra = answer.status_code, answer.content, {}
                content_type = answer.headers.get("content-type", "application/json")
            else:
                status, code = canned
                out = json.dumps({"error": {"code": code, "message": "relay says " + code}}).encode()
                extra = {"Retry-After": "0.1"} if status == 503 else {}
                content_type = "application/json"
            self.send_response(status)
            for k, v in {"content-type": content_type, **extra}.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    r.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield r
    finally:
        server.shutdown()
        server.server_close()


def _user_via(stack, relay: Relay) -> ModelUser:
    from veil.sdk import Deployment

    user = ModelUser(Deployment(relay.url, stack.info.keyservice_url), stack.user.identity, trust=stack.trust)
    user.request_keys.update(stack.user.request_keys)
    return user


def test_busy_and_unavailable_are_retried_with_fresh_envelopes(stack, relay):
    relay.script = [(503, "busy"), (503, "unavailable")]
    user = _user_via(stack, relay)
    x = stack.models[LR].x_test[:2]
    assert_matches_reference(stack.models[LR], x, user.infer(LR, x))
    assert len(relay.seen) == 3
    assert len({e["request_id"] for e in relay.seen}) == 3  # a fresh envelope each time
    assert all(t.isdigit() and int(t) > 0 for t in relay.timeouts)  # the gateway is told the time left
    user.close()


def test_maybe_ran_failures_are_retried_only_when_idempotent(stack, relay):
    user = _user_via(stack, relay)
    x = stack.models[LR].x_test[:1]
    relay.script = [(502, "crashed")]
    with pytest.raises(VeilError) as info:
        user.infer(LR, x)
    assert info.value.code == "crashed" and len(relay.seen) == 1
    relay.script = [(502, "crashed")]
    assert_matches_reference(stack.models[LR], x, user.infer(LR, x, idempotent=True))
    assert len(relay.seen) == 3
    user.close()


def test_nothing_outlives_the_deadline(stack, relay):
    relay.always = (503, "busy")
    user = _user_via(stack, relay)
    t0 = time.monotonic()
    with pytest.raises(VeilError) as info:
        user.infer(LR, stack.models[LR].x_test[:1], deadline_s=1.0)
    elapsed = time.monotonic() - t0
    assert info.value.code == "busy" and elapsed < 1.5, elapsed
    assert 2 <= len(relay.seen) <= 12
    for env in relay.seen:  # every envelope expires with the deadline, so no runtime runs it later
        assert env["expires"] <= time.time() + 3
    user.close()


def test_gateway_refuses_a_malformed_or_spent_time_budget(stack):
    _, env = stack.user.sealed_request(LR, {"input": stack.models[LR].x_test[:1]})
    with httpx.Client(base_url=stack.info.gateway_url, timeout=30) as client:
        r = client.post(f"/v1/models/{LR}:infer", json=env, headers={"x-veil-timeout-ms": "soon"})
        assert r.status_code == 400 and "x-veil-timeout-ms" in r.json()["error"]["message"]
        r = client.post(f"/v1/models/{LR}:infer", json=env, headers={"x-veil-timeout-ms": "0"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
