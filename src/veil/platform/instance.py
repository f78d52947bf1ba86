"""One instance: a runtime subprocess on a loopback port, spoken to with the OpenWhisk protocol.

The instance knows how to spawn, initialise, run one activation and stop; it holds no
scheduling policy. Its mutable scheduling fields (`state`, `inflight`, `last_used`, ...) are
owned by the function pool and only changed under the pool's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from veil.jsonbytes import Encoded
from veil.keepalive import KeepAlive
from veil.platform import lifeline
from veil.platform.errors import ActionError, PlatformError
from veil.platform.memory import Confinement
from veil.platform.spec import FunctionSpec
from veil.platform.template import ForkedProcess, Template
from veil.wire.run import is_binary

log = logging.getLogger("veil.platform.instance")
_JSON = {"Content-Type": "application/json"}

# Instance states. `starting`: spawned, /init not answered yet; `ready`: routable; `draining`:
# finishing in-flight requests, no new ones (stop requested or spec re-deployed); `stopped`:
# stopped by the platform; `dead`: exited or failed on its own.
STARTING, READY, DRAINING, STOPPED, DEAD = "starting", "ready", "draining", "stopped", "dead"


@dataclass
class InstanceInfo:
    """A snapshot of one instance, safe to hand out (no handles, JSON-safe via `to_dict`)."""

    id: str
    function: str
    port: int
    pid: int | None
    inflight: int
    started_at: float  # wall-clock epoch seconds when the spawn began
    last_used: float  # wall-clock epoch seconds of the last finished request (or ready time)
    state: str
    requests: int = 0
    keep_alive_s: float = 0.0
    memory_mb: int = 0
    rss_mb: float | None = None
    peak_rss_mb: float | None = None  # the process's high-water mark (VmHWM) so far
    log_path: str | None = None
    forked: bool = False  # forked from the function's template (no interpreter start-up)
    prewarmed: bool = False  # taken from the pre-attested pool (its start was off the request path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InstanceGone(Exception):
    """The instance vanished under a request: process exited or the connection broke.

    `exit_code` is None when the process is still alive (the connection broke on its own).
    """

    def __init__(self, reason: str, exit_code: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


def free_loopback_port() -> int:
    """A port the kernel just considered free on 127.0.0.1 (the child binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instance_env(spec: FunctionSpec, instance_id: str, api_host: str) -> dict[str, str]:
    """An instance's environment: inherited; defaults the spec's env may override (the
    runtime's request threads = the function's concurrency); then what OpenWhisk's invoker
    exports to an action, and Veil's own identifiers."""
    ns = spec.namespace
    return {
        **os.environ,
        "VEIL_THREADS": str(spec.concurrency),
        **spec.env,
        "__OW_ACTION_NAME": f"/{ns}/{spec.name}",
        "__OW_ACTION_VERSION": "0.0.1",
        "__OW_NAMESPACE": ns,
        "__OW_API_HOST": api_host,
        "VEIL_FUNCTION": spec.name,
        "VEIL_INSTANCE_ID": instance_id,
        "VEIL_MEMORY_MB": str(spec.memory_mb),
        "VEIL_CONCURRENCY": str(spec.concurrency),
    }


def _mono_to_wall(mono: float) -> float:
    return time.time() - (time.monotonic() - mono)


class Instance:
    """One runtime subprocess. Thread-safe for concurrent `run` calls (its connections are).

    `die_with_parent`: the kernel kills the process when this one dies (see
    `veil.platform.lifeline`), for owners that can be killed without running any cleanup, such
    as a Ray Serve replica.
    """

    def __init__(
        self,
        *,
        instance_id: str,
        function: str,
        command: list[str],
        env: dict[str, str],
        memory_mb: int,
        concurrency: int,
        generation: int,
        log_path: Path,
        die_with_parent: bool = False,
    ) -> None:
        self.id = instance_id
        self.die_with_parent = die_with_parent
        self.function = function
        self.command = list(command)
        self.env = dict(env)
        self.memory_mb = memory_mb
        self.concurrency = concurrency
        self.generation = generation
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self.confinement: Confinement | None = None
        self.forked = False
        # Pool fields, guarded by the owning pool's lock: a spare is a pre-attested instance of
        # the warm pool (routable only once a cold start takes it); a suspect answered no
        # request in time and is not routed to until a health probe clears it; `end_reason`
        # says why the platform ended it ("out_of_memory", "unresponsive").
        self.spare = False
        self.prewarmed = False
        self.suspect = False
        self.unhealthy = False
        self.end_reason: str | None = None
        self.client: httpx.Client | None = None  # /init
        self.runs: KeepAlive | None = None  # /run
        # Scheduling fields, guarded by the owning pool's lock.
        self.state = STARTING
        self.inflight = 0
        self.requests = 0
        self.keep_alive_s: float | None = None
        self.started_mono = time.monotonic()
        self.ready_mono: float | None = None
        self.last_used_mono = self.started_mono
        self.start_error: PlatformError | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def spawn(self, template: Template | None = None) -> None:
        """Start the process on a fresh loopback port, output to the log file (never a pipe).

        A pipe nobody reads fills up (64 KiB) and blocks the child on its next write, so stdout
        and stderr go to a file; a new session lets `terminate` kill the whole process group.
        With a `template` the process is forked from it (the runtime already imported); if the
        template cannot fork, the instance starts the ordinary way.
        """
        self.port = free_loopback_port()
        env = {**self.env, "VEIL_PORT": str(self.port)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if template is not None and not self.die_with_parent:
            try:
                self.proc = template.fork(env, self.log_path)
                self.forked = True
            except PlatformError as e:
                log.warning("instance %s of %r: %s; starting it without the template", self.id, self.function, e)
        if self.proc is None:
            self._popen(env)
        if self.confinement is not None:
            try:
                self.confinement.attach(self.proc.pid)  # type: ignore[union-attr]
            except OSError as e:
                log.warning("instance %s of %r: memory limit not applied: %s", self.id, self.function, e)
        self._make_client()

    def _popen(self, env: dict[str, str]) -> None:
        preexec = lifeline.die_with_parent_preexec(os.getpid()) if self.die_with_parent else None
        with open(self.log_path, "ab") as logf:

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    self.command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    preexec_fn=preexec,
                )

            try:
                self.proc = lifeline.spawn_tied(popen) if preexec is not None else popen()
            except OSError as e:
                raise PlatformError(
                    "start_failed",
                    f"function {self.function!r}: cannot spawn instance {self.id} "
                    f"({self.command[0]!r}): {e.strerror or e}",
                ) from e

    def _make_client(self) -> None:
        # One keep-alive pool per instance, sized to its concurrency. Idle connections expire
        # before a typical server's keep-alive (uvicorn: 5 s) so we rarely reuse a closed one.
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            limits=httpx.Limits(
                max_connections=None,  # the pool bounds in-flight requests, not the client
                max_keepalive_connections=self.concurrency + 2,
                keepalive_expiry=2.0,
            ),
            timeout=httpx.Timeout(30.0),
        )
        # /run goes over plain keep-alive connections (`veil.keepalive`): the same answers and
        # errors as httpx, without its per-request cost on every activation; the runtime keeps
        # idle connections open, so they do not expire here
        self.runs = KeepAlive(f"http://127.0.0.1:{self.port}", keep=self.concurrency + 2, idle_expiry_s=float("inf"))

    def initialize(self, init_value: dict, deadline: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait until the port answers, then `POST /init` once (as OpenWhisk's invoker does).

        Retries only on connection refusals (nothing was sent), so /init is delivered once.
        `cancelled` lets the platform abandon a start (instance stopped, platform closed).
        """
        assert self.client is not None and self.proc is not None
        body = json.dumps({"value": init_value}).encode()
        delay = 0.01
        while True:
            if cancelled():
                raise self._start_failure("was stopped while starting")
            code = self.proc.poll()
            if code is not None:
                raise self._start_failure(f"exited with code {code} before answering /init")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_failure("did not answer /init within the start timeout")
            try:
                resp = self.client.post(
                    "/init",
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(remaining, connect=min(remaining, 1.0)),
                )
            except httpx.ConnectError:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 0.1)
                continue
            except httpx.TimeoutException:
                raise self._start_failure("did not answer /init within the start timeout") from None
            except httpx.TransportError as e:
                code = self.wait_exit(0.5)
                raise self._start_failure(
                    f"connection lost during /init ({type(e).__name__})"
                    + (f", exited with code {code}" if code is not None else "")
                ) from None
            if 200 <= resp.status_code < 300:
                return
            raise self._start_failure(f"/init answered {resp.status_code}: {_error_text(resp)}")

    def run(
        self, body: bytes, timeout: float, headers: dict[str, str] | None = None, *, keep_encoding: bool = False
    ) -> dict[str, Any]:
        """POST one activation to `/run` and return the action's JSON object (`{"envelope":
        bytes}` for a binary envelope answer). `headers`: those of a binary-envelope body
        (`veil.platform.dispatch.binary_headers`); JSON by default. `keep_encoding`: a JSON
        answer comes back as a `veil.jsonbytes.Encoded` holding the runtime's bytes too.

        Raises ActionError for `{"error": ...}`, InstanceGone if the process or connection died,
        and httpx.TimeoutException when no answer came within `timeout`.
        """
        assert self.runs is not None
        try:
            status, answer_headers, content = self.runs.request(
                "POST", "/run", body, headers or _JSON, timeout=timeout, connect_timeout=min(timeout, 2.0)
            )
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as e:
            # A crash shows up as a reset or a closed connection; give the exit time to be
            # observable (a loaded host can take a while to tear a process down) so we can
            # tell a crash from a connection that broke on its own.
            code = self.wait_exit(2.0)
            what = f"exited with code {code}" if code is not None else "connection lost"
            raise InstanceGone(f"{what} ({type(e).__name__})", code) from None
        content_type = next((v for k, v in answer_headers if k.lower() == "content-type"), None)
        return parse_run(self.function, status, content, content_type, keep_encoding=keep_encoding)

    async def run_async(self, client: httpx.AsyncClient, body: bytes, timeout: float) -> dict[str, Any]:
        """`run` on an event loop (`client` belongs to that loop): the same answers and errors,
        without a thread per request in flight."""
        try:
            resp = await client.post(
                f"http://127.0.0.1:{self.port}/run",
                content=body,
                headers={"content-type": "application/json"},
                timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            )
        except httpx.TimeoutException:
            raise
        except httpx.TransportError as e:
            code = await asyncio.to_thread(self.wait_exit, 2.0)
            what = f"exited with code {code}" if code is not None else "connection lost"
            raise InstanceGone(f"{what} ({type(e).__name__})", code) from None
        return self._parse_run(resp)

    def _parse_run(self, resp: httpx.Response) -> dict[str, Any]:
        return parse_run(self.function, resp.status_code, resp.content)

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_exit(self, grace: float) -> int | None:
        """The exit code if the process ends within `grace` seconds, else None."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, grace: float = 2.0) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after `grace`. Idempotent."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.runs is not None:
            self.runs.close()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
        # Children the action left behind in its group go too.
        _signal_group(proc, signal.SIGKILL)

    # -- reporting -------------------------------------------------------------------------

    def _start_failure(self, why: str) -> PlatformError:
        tail = self.log_tail()
        if tail:
            log.warning("instance %s of %r failed to start: %s; log tail:\n%s", self.id, self.function, why, tail)
        return PlatformError(
            "start_failed",
            f"function {self.function!r}: instance {self.id} {why} (log: {self.log_path})",
            detail=tail or None,
        )

    def log_tail(self, max_bytes: int = 2000) -> str:
        """The end of the instance's log, for operators (never put into API messages)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def info(self, idle_timeout_s: float) -> InstanceInfo:
        """Snapshot; call under the pool lock so the scheduling fields are consistent."""
        rss = peak = None
        pid = self.proc.pid if self.proc is not None else None
        if pid is not None and self.state in (STARTING, READY, DRAINING):
            rss = _rss_mb(pid)
            peak = _peak_rss_mb(pid)
        return InstanceInfo(
            id=self.id,
            function=self.function,
            port=self.port,
            pid=pid,
            inflight=self.inflight,
            started_at=_mono_to_wall(self.started_mono),
            last_used=_mono_to_wall(self.last_used_mono),
            state=self.state,
            requests=self.requests,
            keep_alive_s=self.keep_alive_s if self.keep_alive_s is not None else idle_timeout_s,
            memory_mb=self.memory_mb,
            rss_mb=rss,
            peak_rss_mb=peak,
            log_path=str(self.log_path),
            forked=self.forked,
            prewarmed=self.prewarmed,
        )


def _signal_group(proc: subprocess.Popen[bytes] | ForkedProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:  # best effort: the process may be gone already
        return None


def parse_run(
    function: str, status: int, content: bytes, content_type: str | None = None, *, keep_encoding: bool = False
) -> dict[str, Any]:
    """The action's result from a `/run` answer (HTTP status and body), or the ActionError it
    stands for. Shared by every caller of /run (this module's instances, Ray replicas' callers).
    A successful binary envelope answer (`content_type`) is `{"envelope": content}`, untouched.
    `keep_encoding`: a JSON result is a `veil.jsonbytes.Encoded`, the parsed object with the
    exact bytes it came as, so a caller that only relays it (the gateway's HE route) need not
    encode it again."""
    if 200 <= status < 300 and is_binary(content_type):
        return {"envelope": content}
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "error" in payload:
        # OpenWhisk treats any result with an "error" field as an application error. Under
        # OpenWhisk a runtime answers those 200 (any other status is a dead container to the
        # invoker) and says the status in the error: keep it, so every platform reports the
        # same status for the same error.
        raise ActionError(function, payload["error"], _error_status(status, payload["error"]))
    if not 200 <= status < 300:
        raise ActionError(
            function,
            {"code": "bad_response", "message": f"/run answered {status} without an error object"},
            status if status >= 400 else 502,
        )
    if not isinstance(payload, dict):
        raise ActionError(
            function,
            {"code": "bad_response", "message": "the action did not return a JSON object"},
            502,
        )
    return Encoded(payload, content) if keep_encoding else payload


def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _error_status(http_status: int, error: Any) -> int:
    """The status of an action error: the HTTP one if it is an error status, else the one the
    error object names (`{"code", "message", "status"}`), else 502."""
    if http_status >= 400:
        return http_status
    named = error.get("status") if isinstance(error, dict) else None
    if isinstance(named, int) and not isinstance(named, bool) and 400 <= named <= 599:
        return named
    return 502


def _error_text(resp: httpx.Response) -> str:
    try:
        payload = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(payload, dict) and "error" in payload:
        err = payload["error"]
        if isinstance(err, dict) and "message" in err:
            return f"{err.get('code', 'error')}: {err['message']}"
        return str(err)[:300]
    return str(payload)[:300]
