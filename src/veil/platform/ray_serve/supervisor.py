"""The runtime subprocess a Ray Serve replica owns, and what happens when it fails.

A replica runs exactly the program a LocalPlatform instance runs (`Instance`: `spec.command`
on a loopback port, `/init` once, `/run` per request), so the runtime is identical on every
platform. Under Ray it additionally:

- binds loopback only (`VEIL_HOST=127.0.0.1`, set after the spec's env so nothing widens it):
  only the replica talks to it;
- dies with its replica (`die_with_parent`: the kernel kills it if the Ray worker is killed);
- is replaced when it crashes, and the request that saw the crash is retried once on the
  replacement; a second failure is `instance_crashed`, as on the local platform;
- backs off when it fails to start (0.5 s, doubling, at most `backoff_max_s`): while backing
  off, requests fail at once with `start_failed` naming the last cause, instead of the replica
  retrying forever or every request waiting for a start that will fail again.

Every outcome is a `wire` answer (a dict), so nothing but plain data crosses the Ray handle.
No Ray import: this runs (and is tested) without Ray.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from veil.platform.dispatch import encode_activation
from veil.platform.errors import PlatformError
from veil.platform.instance import Instance, InstanceGone, instance_env
from veil.platform.ray_serve import wire
from veil.platform.spec import FunctionSpec

log = logging.getLogger("veil.platform.ray_serve.supervisor")
_JSON = {"content-type": "application/json"}
_VALUE_PREFIX = b'{"value":{}'


def activation_body(spec: FunctionSpec, value: bytes | dict[str, Any], deadline: float) -> bytes:
    """The OpenWhisk /run body for `value`: a dict is encoded (`encode_activation`); bytes (a
    JSON object, encoded once by the caller) are spliced in as they are, not decoded and
    encoded again."""
    if isinstance(value, dict):
        return encode_activation(spec, value, deadline)
    if not isinstance(value, bytes) or not value.lstrip().startswith(b"{"):
        raise PlatformError("bad_request", f"function {spec.name!r}: value must be a JSON object", status=400)
    frame = encode_activation(spec, {}, deadline)
    assert frame.startswith(_VALUE_PREFIX), "encode_activation puts the value first"
    return b'{"value":' + value + frame[len(_VALUE_PREFIX) :]


class RuntimeSupervisor:
    """One runtime for one replica. Thread-safe: the replica runs requests on many threads."""

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        replica_id: str,
        log_dir: Path,
        api_host: str = "ray",
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.replica_id = replica_id
        self.log_dir = Path(log_dir)
        self._api_host = api_host
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._clock = clock
        self._cond = threading.Condition()
        self._instance: Instance | None = None
        self._starting = False
        self._closed = False
        self._seq = 0
        self._fail_streak = 0
        self._next_start = 0.0
        self._last_error: PlatformError | None = None
        self.counters = {"starts": 0, "start_failures": 0, "crashes": 0, "retries": 0, "recycled": 0}
        self.cold_start_ms: list[float] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> PlatformError | None:
        """Start the runtime now (the replica's constructor: a replica is routable only once its
        runtime answered /init). Returns the start error, if any, instead of raising."""
        try:
            self._ready(self._clock() + self.spec.start_timeout_s + 5.0, ignore_backoff=True)
        except PlatformError as e:
            return e
        return None

    def check(self) -> None:
        """Health check: replace a runtime that exited while idle (respecting the back-off)."""
        with self._cond:
            inst = self._instance
            if inst is None or inst.exit_code() is None:
                return
            self._drop(inst, crashed=True)
        log.warning("replica %s: runtime exited while idle (code %s); replacing it", self.replica_id, inst.exit_code())
        self.start()

    def recycle(self) -> PlatformError | None:
        """Replace the runtime with a fresh one (a warm-pool replica whose last model left: the
        old process may still hold that model's decrypted weights and cached keys, so a spare
        gets a new process that starts, initialises and attests with nothing secret in it)."""
        with self._cond:
            inst = self._instance
            if inst is None or self._closed:
                return None
            self._drop(inst, crashed=False)
            self.counters["recycled"] += 1
        inst.terminate(grace=0.5)
        return self.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            inst, self._instance = self._instance, None
            self._cond.notify_all()
        if inst is not None:
            inst.terminate()

    # -- requests ----------------------------------------------------------------------------

    def run(self, value: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One activation; a `wire` answer. A crash is retried once on a replacement runtime."""
        deadline = self._clock() + timeout
        first: tuple[Instance, InstanceGone] | None = None
        while True:
            inst: Instance | None = None
            try:
                inst = self._ready(deadline)
                body = self._body(value, deadline, timeout)
                return wire.ok(inst.run(body, deadline - self._clock()))
            except InstanceGone as gone:
                assert inst is not None
                self._gone(inst, gone)
                if first is None:
                    first = self._retrying(inst, gone)
                    continue
                return wire.error(self._crash_error(first, inst, gone))
            except httpx.TimeoutException:
                return wire.error(self._timeout(timeout))
            except PlatformError as e:  # ActionError included: the action's own error
                return wire.error(e)

    async def run_async(self, session: Any, value: bytes | dict[str, Any], timeout: float) -> dict[str, Any]:
        """`run` on the replica's event loop, through `session` (an `aiohttp.ClientSession` of
        that loop, keeping connections to the runtime open). `value` is the JSON object's
        encoding (as the Ray platform sends it) or the object. The runtime's answer is returned
        undecoded (`wire.raw`); only a start or a crash (which block) go to a thread.

        aiohttp rather than httpx here: it is Ray Serve's own HTTP client (so no new
        dependency), and its per-request cost on this path is about a third of httpx's async
        client's (0.4 vs 1.5 ms measured on this machine), which is most of what a replica adds
        to a warm request."""
        import aiohttp

        deadline = self._clock() + timeout
        first: tuple[Instance, InstanceGone] | None = None
        while True:
            inst: Instance | None = self._instance
            try:
                if inst is None:
                    inst = await asyncio.to_thread(self._ready, deadline)
                body = self._body(value, deadline, timeout)
                remaining = max(0.001, deadline - self._clock())
                try:
                    async with session.post(
                        f"http://127.0.0.1:{inst.port}/run",
                        data=body,
                        headers=_JSON,
                        timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=min(remaining, 2.0)),
                    ) as resp:
                        return wire.raw(resp.status, await resp.read())
                except (TimeoutError, aiohttp.ServerTimeoutError):
                    return wire.error(self._timeout(timeout))
                except aiohttp.ClientError as e:
                    code = await asyncio.to_thread(inst.wait_exit, 2.0)
                    what = f"exited with code {code}" if code is not None else "connection lost"
                    raise InstanceGone(f"{what} ({type(e).__name__})", code) from None
            except InstanceGone as gone:
                assert inst is not None
                await asyncio.to_thread(self._gone, inst, gone)
                if first is None:
                    first = self._retrying(inst, gone)
                    continue
                return wire.error(self._crash_error(first, inst, gone))
            except PlatformError as e:
                return wire.error(e)

    def _body(self, value: bytes | dict[str, Any], deadline: float, timeout: float) -> bytes:
        if deadline - self._clock() <= 0:
            raise PlatformError(
                "timeout", f"function {self.spec.name!r}: no result within {timeout:.2f} s (runtime starting)"
            )
        return activation_body(self.spec, value, deadline)

    def _retrying(self, inst: Instance, gone: InstanceGone) -> tuple[Instance, InstanceGone]:
        with self._cond:
            self.counters["retries"] += 1
        return inst, gone

    def _timeout(self, timeout: float) -> PlatformError:
        return PlatformError(
            "timeout",
            f"function {self.spec.name!r}: no result within {timeout:.2f} s (replica "
            f"{self.replica_id} was still running the request)",
        )

    # -- internals ---------------------------------------------------------------------------

    def _ready(self, deadline: float, *, ignore_backoff: bool = False) -> Instance:
        """The live runtime, starting one if there is none (one start at a time; others wait)."""
        with self._cond:
            while True:
                if self._closed:
                    raise PlatformError("closed", f"function {self.spec.name!r}: replica {self.replica_id} is stopping")
                inst = self._instance
                if inst is not None:
                    return inst
                if not self._starting:
                    wait = self._next_start - self._clock()
                    if wait > 0 and not ignore_backoff and self._last_error is not None:
                        raise self._backing_off(wait)
                    self._starting = True
                    break
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise PlatformError(
                        "timeout",
                        f"function {self.spec.name!r}: replica {self.replica_id} did not finish "
                        "starting its runtime in time",
                    )
                self._cond.wait(remaining)
        return self._start_one()

    def _start_one(self) -> Instance:
        self._seq += 1
        instance_id = f"{self.replica_id}-{self._seq}"
        env = {**instance_env(self.spec, instance_id, self._api_host), "VEIL_HOST": "127.0.0.1"}
        inst = Instance(
            instance_id=instance_id,
            function=self.spec.name,
            command=self.spec.command,
            env=env,
            memory_mb=self.spec.memory_mb,
            concurrency=self.spec.concurrency,
            generation=0,
            log_path=self.log_dir / f"{instance_id}.log",
            die_with_parent=True,
        )
        t0 = self._clock()
        error: PlatformError | None = None
        try:
            inst.spawn()
            inst.initialize(dict(self.spec.init_value), t0 + self.spec.start_timeout_s, cancelled=lambda: self._closed)
        except PlatformError as e:
            error = e
        except Exception as e:  # an OS error or a bug must still end the start cleanly
            log.exception("replica %s: starting the runtime failed", self.replica_id)
            error = PlatformError(
                "start_failed", f"function {self.spec.name!r}: instance {instance_id} failed to start: {e}"
            )
        if error is not None:
            inst.terminate(grace=0.5)
        with self._cond:
            self._starting = False
            if error is None and self._closed:
                error = PlatformError("closed", f"function {self.spec.name!r}: replica {self.replica_id} is stopping")
                inst.terminate(grace=0.5)
            if error is None:
                self._instance = inst
                self._fail_streak = 0
                self._last_error = None
                self.counters["starts"] += 1
                self.cold_start_ms.append((self._clock() - t0) * 1000)
                del self.cold_start_ms[:-1000]
            else:
                self._fail_streak += 1
                self._last_error = error
                backoff = min(self._backoff_max, self._backoff_base * 2 ** (self._fail_streak - 1))
                self._next_start = self._clock() + backoff
                self.counters["start_failures"] += 1
            self._cond.notify_all()
        if error is not None:
            log.warning("replica %s: %s", self.replica_id, error.message)
            raise error
        log.info("replica %s: runtime %s ready on 127.0.0.1:%d", self.replica_id, inst.id, inst.port)
        return inst

    def _gone(self, inst: Instance, gone: InstanceGone) -> None:
        """A request lost its runtime: if the process exited, drop it (the next request starts a
        replacement at once; a crash is not a failed start, so no back-off)."""
        with self._cond:
            if self._instance is inst and (gone.exit_code is not None or inst.exit_code() is not None):
                self._drop(inst, crashed=True)
                dropped = True
            else:
                dropped = False
        if dropped:
            inst.terminate(grace=0.2)

    def _drop(self, inst: Instance, *, crashed: bool) -> None:
        """Forget the current runtime (call under the lock)."""
        if self._instance is inst:
            self._instance = None
            if crashed:
                self.counters["crashes"] += 1
            self._cond.notify_all()

    def _backing_off(self, wait: float) -> PlatformError:
        last = self._last_error
        assert last is not None
        return PlatformError(
            "start_failed",
            f"{last.message}; replica {self.replica_id} backs off after {self._fail_streak} failed "
            f"start(s), next attempt in {wait:.1f} s",
            detail=last.detail,
        )

    def _crash_error(self, first: tuple[Instance, InstanceGone], inst: Instance, gone: InstanceGone) -> PlatformError:
        f_inst, f_gone = first
        return PlatformError(
            "instance_crashed",
            f"function {self.spec.name!r}: the request failed twice: instance {f_inst.id} {f_gone.reason}, "
            f"and the retry on instance {inst.id} {gone.reason}. The action likely crashes on this input; "
            f"see {f_inst.log_path} and {inst.log_path}",
        )

    # -- reporting ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._cond:
            inst = self._instance
            return {
                **self.counters,
                "runtime_pid": inst.proc.pid if inst is not None and inst.proc is not None else None,
                "runtime_port": inst.port if inst is not None else None,
                "runtime_id": inst.id if inst is not None else None,
                "last_error": self._last_error.code if self._last_error is not None else None,
            }
