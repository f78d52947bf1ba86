"""The OpenWhisk action protocol on one port: `POST /init` once, then `POST /run`.

The same program is an OpenWhisk blackbox action, a Knative container and a local platform
instance. Requests are served by a bounded pool: at most `threads` run at once, at most `queue`
wait; beyond that a clear 503 "busy". After each activation the OpenWhisk sentinel line is
written to stdout and stderr, as the invoker expects.

The activation fields the invoker sends next to `value` (activation id, action name, namespace,
deadline, API host, transaction id) are per request: an action reads them with
`current_activation()` (a context variable set for the duration of the call). They are never
written into `os.environ`, which every request thread shares.
"""

from __future__ import annotations

import contextvars
import json
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from veil.errors import BadRequest, Busy, VeilError, from_exception

log = logging.getLogger("veil.runtime.action")
SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
MAX_BODY = 48 << 20
ACTIVATION_FIELDS = ("activation_id", "action_name", "namespace", "deadline", "api_host", "transaction_id")


@dataclass(frozen=True)
class Activation:
    """The OpenWhisk activation fields of one /run call (what an action proxy would export as
    `__OW_ACTIVATION_ID`, `__OW_DEADLINE`, ...), as strings; None when the caller sent none."""

    activation_id: str | None = None
    action_name: str | None = None
    namespace: str | None = None
    deadline: str | None = None
    api_host: str | None = None
    transaction_id: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Activation:
        return cls(**{name: str(body[name]) for name in ACTIVATION_FIELDS if body.get(name) is not None})


_ACTIVATION: contextvars.ContextVar[Activation | None] = contextvars.ContextVar("veil_activation", default=None)


def current_activation() -> Activation | None:
    """The activation being served by this thread, or None outside a /run call."""
    return _ACTIVATION.get()


class ActionState:
    """The action built by /init, and the admission control of /run."""

    def __init__(self, threads: int, queue: int) -> None:
        self.action: Any = None
        self.init_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(threads)
        self.capacity = threads + queue
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.started = time.time()
        self.preinitialized = False  # built from VEIL_INIT: the platform's own /init is then accepted once
        self.init_called = False

    def build(self, value: dict[str, Any]) -> dict[str, Any]:
        kind = value.get("kind", "tee")
        if kind == "tee":
            from veil.runtime.tee_action import TeeAction

            self.action = TeeAction(value)
            return self.action.describe()
        if kind == "he":
            from veil.he.action import HEAction

            self.action = HEAction(value)
            return {"kind": "he"}
        raise BadRequest("init.kind: must be 'tee' or 'he'", code="bad_init")


def _error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if (
        isinstance(status, int)
        and isinstance(code, str)
        and isinstance(message, str)
        and not isinstance(exc, VeilError)
    ):
        return status, {"error": {"code": code, "message": message}}  # e.g. veil.he.errors.HEError
    err = from_exception(exc)
    if err.code == "internal":
        log.error("internal error in action: %s", type(exc).__name__)
    return err.status, err.to_json()


def make_handler(state: ActionState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in one segment; without this, Nagle + delayed ACK add 40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt: str, *args: Any) -> None:  # no request lines with ids or bodies
            return

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self._headers_buffer.append(b"\r\n" + data)  # one write for headers and body
            self.flush_headers()

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise VeilError(f"body exceeds {MAX_BODY} bytes", code="too_large", status=413)
            raw = self.rfile.read(length)
            try:
                obj = json.loads(raw or b"{}")
            except (ValueError, RecursionError):
                raise BadRequest("body is not valid JSON", code="malformed") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("value", {}), dict):
                raise BadRequest('body must be {"value": {...}}', code="malformed")
            return obj

        def do_GET(self) -> None:
            if self.path in ("/", "/healthz"):
                self._reply(200, {"ok": True, "initialized": state.action is not None})
            else:
                self._reply(404, {"error": {"code": "not_found", "message": self.path}})

        def do_POST(self) -> None:
            try:
                if self.path == "/init":
                    self._reply(200, self._init(self._body()))
                elif self.path == "/run":
                    self._run(self._body())
                else:
                    self._reply(404, {"error": {"code": "not_found", "message": self.path}})
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a JSON error
                status, body = _error(exc)
                self._reply(status, body)

        def _init(self, body: dict[str, Any]) -> dict[str, Any]:
            with state.init_lock:
                if state.preinitialized and not state.init_called and not body.get("value", {}).get("kind"):
                    state.init_called = True
                    return {"ok": True, "preinitialized": True}
                state.init_called = True
                if state.action is not None:
                    raise VeilError(
                        "Cannot initialize the action more than once.", code="already_initialized", status=403
                    )
                return {"ok": True, **state.build(body.get("value", {}))}

        def _run(self, body: dict[str, Any]) -> None:
            if state.action is None:
                raise VeilError("action is not initialized: POST /init first", code="not_initialized", status=403)
            with state.admit_lock:
                if state.admitted >= state.capacity:
                    raise Busy("instance busy: all request threads and queue slots are taken")
                state.admitted += 1
            token = _ACTIVATION.set(Activation.from_body(body))
            try:
                with state.slots:
                    try:
                        result = state.action.run(body.get("value", {}))
                        self._reply(200, result)
                    except BaseException as exc:  # noqa: BLE001
                        status, err = _error(exc)
                        self._reply(status, err)
            finally:
                _ACTIVATION.reset(token)
                with state.admit_lock:
                    state.admitted -= 1
                print(SENTINEL, flush=True)
                print(SENTINEL, file=sys.stderr, flush=True)

    return Handler


class ActionServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def prewarm_imports() -> threading.Thread:
    """Import the heavy modules (ONNX Runtime, NumPy, the trusted core) in the background from
    process start, so they overlap the platform's port polling and the /init round trip."""

    def work() -> None:
        try:
            import veil.runtime.tee_action  # noqa: F401
        except Exception:  # noqa: BLE001 - /init reports import problems properly
            log.debug("prewarm import failed", exc_info=True)

    thread = threading.Thread(target=work, name="veil-prewarm", daemon=True)
    thread.start()
    return thread


def serve(port: int, *, threads: int = 4, queue: int = 32, host: str = "127.0.0.1", init: dict | None = None) -> None:
    """Serve until killed. `threads` run concurrently; `queue` more may wait.

    `init` (from the `VEIL_INIT` environment variable on OpenWhisk blackbox and Knative, where
    `/init` carries no custom value) initialises the action before the first request.
    """
    state = ActionState(threads, queue)
    if init is not None:
        state.build(init)
        state.preinitialized = True
    server = ActionServer((host, port), make_handler(state))
    log.info("action server on %s:%d (%d threads, queue %d)", host, port, threads, queue)
    server.serve_forever()
