"""The OpenWhisk action protocol on one port: `POST /init` once, then `POST /run`.

The same program is an OpenWhisk blackbox action, a Knative container and a local platform
instance. Requests are served by a bounded pool: at most `threads` run at once, at most `queue`
wait; beyond that a clear "busy" (status 503). After every `/run`, admitted or refused, the
OpenWhisk sentinel line is written to stdout and stderr, as the invoker expects.

`/init` takes either Veil's own init value (`{"value": {"kind": "tee", ...}}`, what the local and
Ray platforms send) or the body OpenWhisk's invoker sends a blackbox action, `{"value": {"name",
"main", "binary", "code", "env"}}`, whose `env` carries the init parameters: `VEIL_INIT` (the init
value as JSON) and any other `VEIL_*` setting (`VEIL_SIM_ROOT`, `VEIL_THREADS`, `VEIL_QUEUE`).
The `__OW_*` entries of `env` describe the first activation only and are not kept.

`/run` failures are application errors: HTTP 200 with `{"error": {"code", "message", "status"}}`,
`status` being the HTTP status the failure stands for. OpenWhisk treats any other status as a
broken container and destroys it, so a bad request must not cost a warm instance.
`VEIL_ERROR_STATUS=http` (not a security setting: it changes only where the status travels) also
sends it as the HTTP status, for callers that read status codes. `/init` failures keep their
status: a failed init is a container that cannot serve.

A `/run` whose body is a binary envelope (`veil.wire.run`: content type
`application/vnd.veil.envelope`, activation fields in headers) is the value `{"envelope": <the
body's bytes>}`, read without base64 or JSON; its success is answered as the binary response
envelope, its failures as the JSON error object.

The activation fields the invoker sends next to `value` (activation id, action name, namespace,
deadline, API host, transaction id) are per request: an action reads them with
`current_activation()` (a context variable set for the duration of the call). They are never
written into `os.environ`, which every request thread shares.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from veil.errors import BadRequest, Busy, VeilError, from_exception
from veil.jsonbytes import Encoded
from veil.wire import run as run_wire

log = logging.getLogger("veil.runtime.action")
SENTINEL = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX"
MAX_BODY = 48 << 20
ACTIVATION_FIELDS = run_wire.ACTIVATION_FIELDS
INIT_ENV = "VEIL_INIT"
ERROR_STATUS_ENV = "VEIL_ERROR_STATUS"
# the keys of the /init value OpenWhisk's invoker sends (WhiskAction.containerInitializer)
OPENWHISK_INIT_KEYS = frozenset({"name", "main", "binary", "code", "env"})
MAX_THREADS, MAX_QUEUE = 256, 4096
# request head limits, as http.server's own (http.client._MAXLINE, _MAXHEADERS)
MAX_HEADER_LINE, MAX_HEADERS = 65536, 100
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class RequestHeaders:
    """The header fields of one request, looked up case-insensitively (`get`, as
    `email.message.Message.get`: the first field of a name wins)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._fields.get(name.lower(), default)

    def __getitem__(self, name: str) -> str | None:
        return self._fields.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields


class HeadError(Exception):
    """A request head this server refuses (status, reason), answered before any body is read."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def read_head_fields(rfile: Any) -> RequestHeaders:
    """The header block of an HTTP/1.x request, read line by line up to the empty line.

    `http.server` parses headers with the `email` package: about a quarter of a millisecond
    per request, a third of what this server spends on a small `/run` besides the action. The
    same limits apply (lines of at most 64 KiB, at most 100 fields); folded (obsolete) lines and
    lines without a colon are refused, and so are conflicting Content-Length fields."""
    fields: dict[str, str] = {}
    count = 0
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise HeadError(431, "Line too long")
        if line in (b"\r\n", b"\n", b""):
            return RequestHeaders(fields)
        count += 1
        if count > MAX_HEADERS:
            raise HeadError(431, "Too many headers")
        if line[:1] in (b" ", b"\t"):
            raise HeadError(400, "folded header lines are not accepted")
        name, sep, value = line.partition(b":")
        key = name.decode("latin-1").lower()
        if not sep or not key or key != key.strip():
            raise HeadError(400, "malformed header line")
        text = value.strip().decode("latin-1")
        if key in fields:
            if key == "content-length" and fields[key] != text:
                raise HeadError(400, "conflicting Content-Length fields")
            continue
        fields[key] = text


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


def parse_init(text: str | dict[str, Any], where: str = INIT_ENV) -> dict[str, Any]:
    """An init value given as JSON text (an environment variable, an OpenWhisk init parameter)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        raise BadRequest(f"{where}: not valid JSON", code="bad_init") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: must be a JSON object (the init value)", code="bad_init")
    return value


def _bounded_int(environ: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    text = environ.get(name)
    if text is None:
        return None
    if not str(text).isdigit() or not lo <= int(text) <= hi:
        raise BadRequest(f"{name}: must be an integer in [{lo}, {hi}]", code="bad_init")
    return int(text)


def split_init_body(value: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """(init value or None, the VEIL_* settings that came with it) of an `/init` value.

    Veil's platforms send the init value itself. OpenWhisk's invoker sends `{"name", "main",
    "binary", "code", "env"}` with the init parameters (all strings) in `env`; the init value is
    then `env.VEIL_INIT`, and None when there is none (a container preinitialised from its own
    VEIL_INIT environment variable)."""
    if not value:
        return None, {}
    if "kind" in value or not set(value) <= OPENWHISK_INIT_KEYS:
        return value, {}
    env = value.get("env", {})
    if env is None:
        env = {}
    if not isinstance(env, dict):
        raise BadRequest("value.env: must be an object of init parameters", code="malformed")
    settings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in env.items() if k.startswith("VEIL_")}
    init = env.get(INIT_ENV)
    if init is None:
        return None, settings
    if not isinstance(init, str | dict):
        raise BadRequest(f"value.env.{INIT_ENV}: must be the init value as JSON text", code="bad_init")
    return parse_init(init, f"value.env.{INIT_ENV}"), settings


def activation_deadline(body: dict[str, Any]) -> float | None:
    """The activation's deadline (Unix seconds) from OpenWhisk's `deadline` field (epoch
    milliseconds, as a string or a number), or None when the caller sent none."""
    raw = body.get("deadline")
    if raw is None:
        return None
    text = str(raw).strip()
    if isinstance(raw, bool) or not text.isdigit() or len(text) > 16:
        raise BadRequest("deadline: must be epoch milliseconds", code="malformed")
    return int(text) / 1000.0


def _check_deadline(deadline: float | None, when: str) -> None:
    """Refuse work whose caller has stopped waiting: it would only take a thread from live ones."""
    if deadline is not None and time.time() >= deadline:
        raise VeilError(
            f"the request's deadline passed {when}; dropped without running", code="deadline_exceeded", status=504
        )


class ActionState:
    """The action built by /init, and the admission control of /run."""

    def __init__(self, threads: int, queue: int, *, http_error_status: bool = False) -> None:
        self.action: Any = None
        self.init_lock = threading.Lock()
        self.admit_lock = threading.Lock()
        self.admitted = 0
        self.resize(threads, queue)
        self.started = time.time()
        self.preinitialized = False  # built from VEIL_INIT: the platform's own /init is then accepted once
        self.preinit_value: dict[str, Any] | None = None
        self.init_called = False
        self.http_error_status = http_error_status

    def resize(self, threads: int, queue: int) -> None:
        """Set the pool's size; only before the action exists (nothing can be admitted yet)."""
        with self.admit_lock:
            if self.admitted:
                raise VeilError("cannot resize the request pool while requests run", code="busy", status=503)
            self.threads, self.queue = threads, queue
            self.slots = threading.BoundedSemaphore(threads)
            self.capacity = threads + queue

    def build(self, value: dict[str, Any], settings: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Build the action `value` describes. `settings` (OpenWhisk init parameters) override the
        process environment for what the action reads from it."""
        environ: Mapping[str, str] = {**os.environ, **settings} if settings else os.environ
        kind = value.get("kind", "tee")
        if kind == "tee":
            from veil.runtime.tee_action import TeeAction

            self.action = TeeAction(value, environ)
            return self.action.describe()
        if kind == "he":
            from veil.he.action import HEAction

            self.action = HEAction(value)
            return {"kind": "he"}
        raise BadRequest("init.kind: must be 'tee' or 'he'", code="bad_init")


def describe_failure(exc: BaseException) -> str:
    """`code: message` of a failure, for a one-line log or exit message."""
    status, body = _error(exc)
    err = body.get("error", {})
    return f"{err.get('code')}: {err.get('message')} (status {status})"


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


_SENTINEL_LINE = (SENTINEL + "\n").encode()


def mark_activation_end() -> None:
    """The OpenWhisk sentinel line on stdout and on stderr: one write each, straight to the
    descriptor once the stream's own buffer is out (`print(..., flush=True)` made two writes per
    stream when unbuffered, a fifth of a small `/run`'s time besides the action). A stream with
    no descriptor (captured in tests) gets it through `print`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            print(SENTINEL, file=stream, flush=True)
            continue
        os.write(fd, _SENTINEL_LINE)


def make_handler(state: ActionState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body go out in one segment; without this, Nagle + delayed ACK add 40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt: str, *args: Any) -> None:  # no request lines with ids or bodies
            return

        def parse_request(self) -> bool:
            """An `HTTP/1.0` or `HTTP/1.1` request line with a lean header parser
            (`read_head_fields`); any other request line goes to `http.server`'s own parser,
            with its own answers."""
            words = self.raw_requestline.split()
            if len(words) != 3 or words[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
                return super().parse_request()
            self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.command, path = words[0].decode("latin-1"), words[1].decode("latin-1")
            self.path = "/" + path.lstrip("/") if path.startswith("//") else path  # as http.server (gh-87389)
            self.request_version = words[2].decode()
            try:
                self.headers = read_head_fields(self.rfile)  # type: ignore[assignment]
            except HeadError as err:
                self.close_connection = True
                self.send_error(err.status, err.reason)
                return False
            connection = (self.headers.get("Connection") or "").lower()
            keep = connection == "keep-alive" if self.request_version == "HTTP/1.0" else connection != "close"
            self.close_connection = not keep
            if (self.headers.get("Expect") or "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
                return self.handle_expect_100()
            return True

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            """The answer in one write when it is small: status line, the two content headers
            (and `Connection: close` when this connection ends), the body."""
            envelope = body.get("envelope")
            if isinstance(envelope, bytes) and len(body) == 1:  # a binary envelope answer, as it is
                data, content_type = envelope, run_wire.BINARY_CONTENT_TYPE
            elif isinstance(body, Encoded):  # the action encoded its answer itself (HE: base64url bulk)
                data, content_type = body.encoded, "application/json"
            else:
                data, content_type = json.dumps(body, separators=(",", ":")).encode(), "application/json"
            head = (
                f"{self.protocol_version} {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                + ("Connection: close\r\n" if self.close_connection else "")
                + "\r\n"
            ).encode("latin-1")
            if len(data) <= 65536:
                self.wfile.write(head + data)  # one write for headers and body
            else:  # a large body is not copied to join the headers
                self.wfile.write(head)
                self.wfile.write(data)

        def _body(self, *, binary: bool = False) -> dict[str, Any]:
            """The JSON body `{"value": {...}, ...}`; with `binary`, a binary envelope body is
            taken too, as `{"value": {"envelope": bytes}, <activation fields from headers>}`."""
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not declared.isdigit():
                self.close_connection = True  # the body's end is unknown: this connection cannot go on
                raise BadRequest("Content-Length: must be a byte count", code="malformed")
            length = int(declared)
            if length > MAX_BODY:
                self.close_connection = True  # the body stays unread
                raise VeilError(f"body exceeds {MAX_BODY} bytes", code="too_large", status=413)
            raw = self.rfile.read(length)
            if binary and run_wire.is_binary(self.headers.get("Content-Type")):
                fields = {f: self.headers.get(h) for f, h in run_wire.FIELD_HEADERS.items()}
                return {"value": {"envelope": raw}, **{f: v for f, v in fields.items() if v is not None}}
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
            if self.path == "/run":
                self._activation()
                return
            try:
                if self.path == "/init":
                    self._reply(200, self._init(self._body()))
                else:
                    self._reply(404, {"error": {"code": "not_found", "message": self.path}})
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a JSON error
                status, body = _error(exc)
                self._reply(status, body)

        def _init(self, body: dict[str, Any]) -> dict[str, Any]:
            init, settings = split_init_body(body.get("value", {}))
            with state.init_lock:
                if state.preinitialized and not state.init_called and init in (None, state.preinit_value):
                    state.init_called = True  # the platform's own /init of a container built from VEIL_INIT
                    return {"ok": True, "preinitialized": True}
                state.init_called = True
                if state.action is not None:
                    raise VeilError(
                        "Cannot initialize the action more than once.", code="already_initialized", status=403
                    )
                if init is None:
                    raise BadRequest(
                        f'no init value: send {{"value": {{"kind": ...}}}} or the init parameter {INIT_ENV} '
                        f"(OpenWhisk: value.env.{INIT_ENV}), or start the runtime with {INIT_ENV} set",
                        code="bad_init",
                    )
                threads = _bounded_int(settings, "VEIL_THREADS", 1, MAX_THREADS)
                queue = _bounded_int(settings, "VEIL_QUEUE", 0, MAX_QUEUE)
                if threads is not None or queue is not None:
                    state.resize(threads or state.threads, state.queue if queue is None else queue)
                return {"ok": True, **state.build(init, settings)}

        def _activation(self) -> None:
            """One /run: the answer (200, failures inside it), then the end-of-activation markers,
            whether or not the request was admitted."""
            try:
                try:
                    status, answer = 200, self._run(self._body(binary=True))
                except BaseException as exc:  # noqa: BLE001 - an application error, not a dead container
                    status, answer = _error(exc)
                    err = answer.get("error")
                    if isinstance(err, dict):
                        answer = {**answer, "error": {**err, "status": status}}
                self._reply(status if state.http_error_status else 200, answer)
            finally:
                mark_activation_end()

        def _run(self, body: dict[str, Any]) -> dict[str, Any]:
            if state.action is None:
                raise VeilError("action is not initialized: POST /init first", code="not_initialized", status=403)
            deadline = activation_deadline(body)
            _check_deadline(deadline, "before it was admitted")
            with state.admit_lock:
                if state.admitted >= state.capacity:
                    raise Busy("instance busy: all request threads and queue slots are taken")
                state.admitted += 1
            token = _ACTIVATION.set(Activation.from_body(body))
            try:
                wait = None if deadline is None else max(0.0, deadline - time.time())
                if not state.slots.acquire(timeout=wait):
                    _check_deadline(0.0, "while it waited for a request thread")
                try:
                    # the platform gave up on it at its deadline: work started later is wasted
                    _check_deadline(deadline, "while it waited for a request thread")
                    return state.action.run(body.get("value", {}))
                finally:
                    state.slots.release()
            finally:
                _ACTIVATION.reset(token)
                with state.admit_lock:
                    state.admitted -= 1

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


def serve(
    port: int,
    *,
    threads: int = 4,
    queue: int = 32,
    host: str = "127.0.0.1",
    init: dict | None = None,
    http_error_status: bool = False,
) -> None:
    """Serve until killed. `threads` run concurrently; `queue` more may wait.

    `init` (from the `VEIL_INIT` environment variable, for Knative, which has no init call)
    initialises the action before the port opens, so a pod is ready only once it attested; a
    platform's later `/init` without a different value is then accepted once. A failing `init`
    raises before anything listens.
    """
    state = ActionState(threads, queue, http_error_status=http_error_status)
    if init is not None:
        state.build(init)
        state.preinitialized = True
        state.preinit_value = init
    server = ActionServer((host, port), make_handler(state))
    log.info("action server on %s:%d (%d threads, queue %d)", host, port, threads, queue)
    server.serve_forever()
