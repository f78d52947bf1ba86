"""OpenWhiskClient against a tiny fake OpenWhisk REST server on loopback.

The fake implements the endpoints the client uses and checks their shapes the way the
OpenWhisk controller does (basic auth, overwrite flag, blackbox exec, blocking+result flags),
answering 400/401 when they are wrong so a client bug fails the test.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from veil.platform import ActionError, FunctionSpec, PlatformError
from veil.platform.openwhisk import ActionLimits, OpenWhiskClient

AUTH = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP"


class FakeOpenWhisk:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.actions: dict[str, dict] = {}
        self.polls = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a: object) -> None:
                pass

            def _send(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urlparse(self.path)
                n = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(n)) if n else None
                fake.requests.append(
                    {"method": self.command, "path": url.path, "query": parse_qs(url.query), "body": body}
                )
                expected = "Basic " + base64.b64encode(AUTH.encode()).decode()
                if self.headers.get("authorization") != expected:
                    return self._send(401, {"error": "The supplied authentication is invalid"})
                parts = url.path.split("/")
                # /api/v1/namespaces/{ns}/{actions|activations}/{name}
                if len(parts) != 7 or parts[:4] != ["", "api", "v1", "namespaces"]:
                    return self._send(404, {"error": "The requested resource does not exist."})
                _, _, _, _, ns, kind, name = parts
                q = parse_qs(url.query)
                if kind == "actions" and self.command == "PUT":
                    if name in fake.actions and q.get("overwrite") != ["true"]:
                        return self._send(409, {"error": "resource already exists"})
                    ex = (body or {}).get("exec", {})
                    if ex.get("kind") != "blackbox" or not ex.get("image"):
                        return self._send(400, {"error": "exec must be blackbox with an image"})
                    if body.get("name") != name or not isinstance(body.get("limits"), dict):
                        return self._send(400, {"error": "bad action body"})
                    fake.actions[name] = body
                    return self._send(200, {**body, "namespace": ns, "version": "0.0.1"})
                if kind == "actions" and self.command == "GET":
                    if name not in fake.actions:
                        return self._send(404, {"error": "The requested resource does not exist."})
                    return self._send(200, fake.actions[name])
                if kind == "actions" and self.command == "DELETE":
                    fake.actions.pop(name, None)
                    return self._send(200, {})
                if kind == "actions" and self.command == "POST":
                    if name not in fake.actions:
                        return self._send(404, {"error": "The requested resource does not exist."})
                    if q.get("blocking") != ["true"] or q.get("result") != ["true"]:
                        return self._send(400, {"error": "client must ask blocking=true&result=true"})
                    if body.get("fail"):
                        return self._send(502, {"error": {"code": "bad_input", "message": "no"}})
                    if body.get("slow"):
                        return self._send(202, {"activationId": "a1b2c3"})
                    return self._send(200, {"echo": body, "action": name})
                if kind == "activations" and self.command == "GET":
                    fake.polls += 1
                    if fake.polls < 2:
                        return self._send(404, {"error": "not yet"})
                    return self._send(
                        200,
                        {
                            "activationId": name,
                            "response": {"status": "success", "success": True, "result": {"late": True}},
                        },
                    )
                return self._send(405, {"error": "method not allowed"})

            do_GET = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_ow() -> Iterator[FakeOpenWhisk]:
    fake = FakeOpenWhisk()
    try:
        yield fake
    finally:
        fake.close()


def test_create_and_invoke_blackbox_action(fake_ow):
    with OpenWhiskClient(fake_ow.url, AUTH, namespace="guest") as ow:
        created = ow.put_action(
            "veil-tee", "veil/runtime:0.1.0", limits=ActionLimits(memory_mb=1024, concurrency=8, timeout_ms=30_000)
        )
        assert created["exec"] == {"kind": "blackbox", "image": "veil/runtime:0.1.0"}
        put = fake_ow.requests[-1]
        assert put["method"] == "PUT" and put["path"] == "/api/v1/namespaces/guest/actions/veil-tee"
        assert put["query"] == {"overwrite": ["true"]}
        assert put["body"]["limits"] == {"timeout": 30_000, "memory": 1024, "logs": 10, "concurrency": 8}
        # overwrite=true makes create idempotent (update)
        ow.put_action("veil-tee", "veil/runtime:0.1.1")
        assert fake_ow.actions["veil-tee"]["exec"]["image"] == "veil/runtime:0.1.1"

        assert ow.invoke("veil-tee", {"x": 1}) == {"echo": {"x": 1}, "action": "veil-tee"}
        inv = fake_ow.requests[-1]
        assert inv["method"] == "POST" and inv["body"] == {"x": 1}
        assert inv["query"] == {"blocking": ["true"], "result": ["true"]}
        assert ow.get_action("veil-tee")["name"] == "veil-tee"


def test_deploy_function_maps_the_spec(fake_ow):
    spec = FunctionSpec(
        "veil-he",
        ["python", "-m", "veil.runtime"],
        init_value={"kind": "he"},
        memory_mb=2048,
        concurrency=4,
        env={"VEIL_LOG": "info"},
    )
    with OpenWhiskClient(fake_ow.url, AUTH, namespace="guest") as ow:
        ow.deploy_function(spec, "veil/runtime:0.1.0")
    body = fake_ow.actions["veil-he"]
    assert body["limits"]["memory"] == 2048 and body["limits"]["concurrency"] == 4
    params = {p["key"]: p for p in body["parameters"]}
    assert json.loads(params["VEIL_INIT"]["value"]) == {"kind": "he"}
    assert params["VEIL_INIT"]["init"] is True and params["VEIL_LOG"]["value"] == "info"


def test_application_error_unknown_action_and_bad_auth(fake_ow):
    with OpenWhiskClient(fake_ow.url, AUTH, namespace="guest") as ow:
        ow.put_action("a", "img")
        with pytest.raises(ActionError) as ei:
            ow.invoke("a", {"fail": True})
        assert ei.value.status == 502 and ei.value.body == {"code": "bad_input", "message": "no"}
        with pytest.raises(PlatformError) as ei:
            ow.invoke("missing", {})
        assert ei.value.code == "unknown_function" and ei.value.status == 404
        ow.delete_action("a")
        assert "a" not in fake_ow.actions
    with OpenWhiskClient(fake_ow.url, AUTH.split(":")[0] + ":wrong", namespace="guest") as bad:
        with pytest.raises(PlatformError) as ei:
            bad.put_action("b", "img")
        assert ei.value.code == "unauthorized" and "401" in ei.value.message


def test_accepted_202_is_followed_by_polling_the_activation(fake_ow):
    with OpenWhiskClient(fake_ow.url, AUTH, namespace="guest") as ow:
        ow.put_action("a", "img")
        assert ow.invoke("a", {"slow": True}, timeout=10) == {"late": True}
    polls = [r for r in fake_ow.requests if r["path"].endswith("/activations/a1b2c3")]
    assert len(polls) == 2 and all(r["method"] == "GET" for r in polls)


def test_wskprops(tmp_path, fake_ow):
    props = tmp_path / "wskprops"
    props.write_text(f"APIHOST={fake_ow.url}\nAUTH={AUTH}\nNAMESPACE=guest\n")
    with OpenWhiskClient.from_wskprops(props) as ow:
        ow.put_action("a", "img")
    assert fake_ow.requests[-1]["path"] == "/api/v1/namespaces/guest/actions/a"
    (tmp_path / "bad").write_text("APIHOST=x\n")
    with pytest.raises(PlatformError) as ei:
        OpenWhiskClient.from_wskprops(tmp_path / "bad")
    assert "AUTH" in ei.value.message
