"""The owner's channel to the KeyService is authenticated both ways: a real HTTP proxy between the
owner and the KeyService (the untrusted network) drops, forges, swaps and delays messages, and
the client catches every one; nothing it does silently succeeds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from ks_helpers import RUNTIME, setup_model

from veil.attest.measurement import measure
from veil.errors import VeilError
from veil.keyservice.client import PrincipalClient

Forwarded = tuple[int, dict[str, str], bytes]


@dataclass
class Proxy:
    """Forwards to `upstream` unless `hook(method, path, headers, body)` answers instead."""

    upstream: str
    hook: Callable[[str, str, dict, bytes], Forwarded | None] | None = None
    seen: list[tuple[str, str, dict, bytes]] = field(default_factory=list)
    answers: list[Forwarded] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def forward(self, method: str, path: str, headers: dict, body: bytes) -> Forwarded:
        keep = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")}
        r = httpx.request(method, self.upstream + path, headers=keep, content=body, timeout=10)
        return (
            r.status_code,
            {k: v for k, v in r.headers.items() if k.lower().startswith(("x-veil", "content-type"))},
            r.content,
        )


@pytest.fixture
def proxy(keyservice_server) -> Iterator[Proxy]:
    p = Proxy(keyservice_server.url)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = dict(self.headers.items())
            p.seen.append((self.command, self.path, headers, body))
            answer = p.hook(self.command, self.path, headers, body) if p.hook else None
            if answer is None:
                answer = p.forward(self.command, self.path, headers, body)
                p.answers.append(answer)
            status, out_headers, out = answer
            self.send_response(status)
            for k, v in out_headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PUT = do_POST = do_DELETE = _any

    p.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=p.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield p
    finally:
        p.server.shutdown()
        p.server.server_close()


def _owner_via(proxy: Proxy, ks, identity) -> PrincipalClient:
    client = PrincipalClient(
        proxy.url, identity, expected_measurements={measure("keyservice")}, trust=ks.trust(), allow_simulated=True
    )
    ks.clients.append(client)
    client.connect()
    return client


def _granted(ks, user_id: str) -> bool:
    try:
        ks.runtime(RUNTIME).release("iris", user_id)
        return True
    except VeilError as exc:
        assert exc.code == "not_granted", exc.code
        return False


def test_dropped_revoke_answered_200_is_caught(keyservice_server, proxy) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    owner = _owner_via(proxy, ks, m.owner.identity)

    def drop_revoke(method, path, headers, body):
        if method == "DELETE" and "/grants/" in path:
            forged = b'{"v":1,"model":"iris","user":"%s","granted":false}' % m.user.identity.id.encode()
            return 200, {"content-type": "application/json"}, forged
        return None

    proxy.hook = drop_revoke
    with pytest.raises(VeilError) as info:
        owner.revoke("iris", m.user.identity.id)
    assert info.value.code == "answer_unauthenticated"
    assert _granted(ks, m.user.identity.id)  # the revoke never arrived, and the owner knows it


def test_forged_signature_header_and_altered_body_are_caught(keyservice_server, proxy) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    owner = _owner_via(proxy, ks, m.owner.identity)

    def alter(method, path, headers, body):
        if method == "PUT" and "/measurements" in path:
            status, out_headers, out = proxy.forward(method, path, headers, body)
            return status, out_headers, out.replace(b'"iris"', b'"iris" ')  # same meaning, other bytes
        return None

    proxy.hook = alter
    with pytest.raises(VeilError) as info:
        owner.set_measurements("iris", [RUNTIME])
    assert info.value.code == "answer_unauthenticated"


def test_genuine_answer_to_another_request_is_caught(keyservice_server, proxy) -> None:
    """The proxy keeps the KeyService's signed 200 to the first revoke and replays it as the
    answer to a later revoke (which it drops): the signature covers the request it answered."""
    ks = keyservice_server
    m = setup_model(ks)
    owner = _owner_via(proxy, ks, m.owner.identity)
    owner.revoke("iris", m.user.identity.id)
    recorded = proxy.answers[-1]
    assert recorded[0] == 200
    owner.grant("iris", m.user.identity.id)
    proxy.hook = lambda method, path, headers, body: recorded if method == "DELETE" else None
    with pytest.raises(VeilError) as info:
        owner.revoke("iris", m.user.identity.id)
    assert info.value.code == "answer_unauthenticated"
    assert _granted(ks, m.user.identity.id)


def test_grant_held_back_past_a_later_revoke_is_refused(keyservice_server, proxy) -> None:
    """The network holds a signed grant, lets the owner's later revoke through, then delivers the
    grant. The KeyService refuses it (sequence number below the revoke's); the user stays revoked
    and the owner's grant call was an error, not a success."""
    ks = keyservice_server
    m = setup_model(ks)
    m.owner.revoke("iris", m.user.identity.id)
    owner = _owner_via(proxy, ks, m.owner.identity)
    held: list[tuple[str, str, dict, bytes]] = []

    def hold_grants(method, path, headers, body):
        if method == "PUT" and "/grants/" in path:
            held.append((method, path, headers, body))
            return 504, {"content-type": "application/json"}, b'{"error":{"code":"timeout","message":"held"}}'
        return None

    proxy.hook = hold_grants
    with pytest.raises(VeilError) as info:
        owner.grant("iris", m.user.identity.id)
    assert info.value.code == "answer_unauthenticated"  # an unsigned 504 is not the KeyService's word
    proxy.hook = None
    owner.revoke("iris", m.user.identity.id)  # later, through the same network
    status, _, body = proxy.forward(*held[0])
    assert status == 401 and b"stale_sequence" in body
    assert not _granted(ks, m.user.identity.id)


def test_answers_are_signed_for_errors_too(keyservice_server, proxy) -> None:
    """A genuine refusal is signed as well: the client reports the KeyService's own code."""
    ks = keyservice_server
    m = setup_model(ks)
    owner = _owner_via(proxy, ks, m.owner.identity)
    with pytest.raises(VeilError) as info:
        owner.grant("no-such-model", m.user.identity.id)
    assert info.value.code == "unknown_model"


def test_lowered_sequence_counter_does_not_reopen_a_replay(tmp_path, keyservice_factory) -> None:
    """The operator captures a signed grant, the owner later revokes, then the operator lowers the
    stored sequence counter and restarts the KeyService to replay the grant: the audit chain
    remembers the highest accepted number, so the replay is still refused."""
    import sqlite3

    from ks_helpers import error_of, signed

    state = tmp_path / "ks"
    first = keyservice_factory.start(state)
    m = setup_model(first)
    path = f"/v1/models/iris/grants/{m.user.identity.id}"
    captured = m.owner.identity.sign_request("PUT", path, b"").as_dict()
    assert first.http().put(path, headers=captured).status_code == 200
    m.owner.revoke("iris", m.user.identity.id)
    keyservice_factory.stop(first)
    with sqlite3.connect(state / "keyservice.db", isolation_level=None) as db:
        db.execute("UPDATE principal_seq SET last_seq = 1")
    second = keyservice_factory.start(state)
    replay = second.http().put(path, headers=captured)
    assert error_of(replay) == (401, "stale_sequence")
    assert not _granted(second, m.user.identity.id)
    fresh = signed(second.http(), m.owner.identity, "PUT", "/v1/models/iris/measurements", {"measurements": [RUNTIME]})
    assert fresh.status_code == 200, fresh.text  # the owner's next (fresh) request is fine


def test_oversized_request_gets_a_signed_too_large(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    from veil.keyservice import wire

    with pytest.raises(VeilError) as info:
        m.owner._signed("PUT", "/v1/models/iris/measurements", {"pad": "a" * (wire.MAX_BODY + 1)})
    assert info.value.code == "too_large" and info.value.status == 413
