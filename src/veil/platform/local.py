"""The embedded serverless platform: one OpenWhisk invoker's worth, on this machine.

Functions are deployed with memory, per-instance concurrency, min/max instances and an idle
timeout; instances are runtime subprocesses on loopback ports speaking the OpenWhisk action
protocol. The first request cold-starts an instance, more start when all are at their
concurrency, idle ones stop after their keep-alive (scale to zero), and a crashed instance is
replaced with its in-flight request retried once. An instance over its function's memory is
stopped (`veil.platform.memory`: a cgroup where the machine allows one, else an RSS watchdog)
and its requests fail with `out_of_memory`; one that lets a request pass its deadline without
an answer is probed and, if it does not answer, killed and replaced. A function may keep a
warm pool of pre-initialised spares (`prewarm`) and fork its instances from a pre-imported
template (`fork_template`). See docs/platform.md and docs/operations.md.

    platform = LocalPlatform(log_dir=Path("logs"))
    platform.deploy(FunctionSpec("echo", [sys.executable, "-m", "veil.runtime"], memory_mb=256))
    platform.invoke("echo", {"x": 1}, timeout=10)
    platform.metrics("echo")["gb_seconds"]
    platform.close()
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from veil.platform import dispatch
from veil.platform.errors import ActionError, PlatformError
from veil.platform.instance import InstanceInfo
from veil.platform.memory import detect as detect_memory_enforcer
from veil.platform.metrics import totals
from veil.platform.pool import FunctionPool
from veil.platform.protocol import Routing
from veil.platform.spec import FunctionSpec

__all__ = ["ActionError", "FunctionSpec", "InstanceInfo", "LocalPlatform", "PlatformError"]

log = logging.getLogger("veil.platform.local")


class LocalPlatform:
    """Deploy, invoke, scale and meter functions whose instances are local subprocesses.

    Thread-safe: invoke from as many threads as you like. A reaper thread stops idle instances
    every `reap_interval_s`. Instance output goes to `log_dir/<instance id>.log` (a temporary
    directory removed by `close()` when no `log_dir` is given). Call `close()` (or use it as a
    context manager); instances are also killed when the platform is garbage-collected or the
    interpreter exits, so no orphan processes stay behind.

    Implements `veil.platform.protocol.Platform` and `InstanceControl`: it schedules requests
    over instances without knowing models (`routes_models = False`), so model affinity is the
    packer's job, through `start_instance` / `invoke_instance` / `stop_instance`.
    """

    kind = "local"
    routes_models = False
    #: a value `{"envelope": bytes}` (a binary envelope) goes to the runtime as it is (`dispatch`)
    binary_envelopes = True

    def __init__(
        self,
        *,
        log_dir: Path | None = None,
        reap_interval_s: float = 0.1,
        api_host: str = "local",
        memory_enforcement: str = "auto",
    ) -> None:
        """`memory_enforcement`: "auto" (a cgroup if the machine allows one, else the RSS
        watchdog), "cgroup" (the same, warning when it falls back), "watchdog", or "off"
        (memory is only billed)."""
        if memory_enforcement not in ("auto", "cgroup", "watchdog", "off"):
            raise PlatformError(
                "bad_spec", f"memory_enforcement must be auto, cgroup, watchdog or off (got {memory_enforcement!r})"
            )
        self._enforcer = detect_memory_enforcer(memory_enforcement)
        self.memory_enforcement = self._enforcer.kind if self._enforcer is not None else "off"
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="veil-platform-")) if log_dir is None else Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._origin = time.monotonic()
        self._origin_wall = time.time()
        self._api_host = api_host
        self._lock = threading.RLock()
        self._pools: dict[str, FunctionPool] = {}
        self._routing: dict[str, Routing] = {}
        self._removed: dict[str, FunctionPool] = {}  # kept so their metrics stay readable
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._reaper = threading.Thread(
            target=_reap_loop,
            args=(weakref.ref(self), self._stop, reap_interval_s),
            name="veil-platform-reaper",
            daemon=True,
        )
        self._reaper.start()
        self._finalizer = weakref.finalize(self, _close_pools, self._pools, self._stop, self._enforcer)

    # -- functions -------------------------------------------------------------------------

    def deploy(self, spec: FunctionSpec, *, routing: Routing | None = None) -> None:
        """Create the function, or update it (idempotent). Scaling knobs apply at once; a new
        command, env, init value or memory drains the running instances and new ones start.

        `routing` is kept only for `unload` (its unload request): this platform does not place
        requests by model, the caller does."""
        spec = copy.deepcopy(spec)
        spec.validate()
        with self._lock:
            self._check_open()
            if routing is not None:
                self._routing[spec.name] = routing
            pool = self._pools.get(spec.name)
            if pool is None:
                self._removed.pop(spec.name, None)
                self._pools[spec.name] = FunctionPool(
                    spec,
                    log_dir=self.log_dir,
                    origin=self._origin,
                    next_id=self._next_id,
                    api_host=self._api_host,
                    enforcer=self._enforcer,
                )
                log.info(
                    "deployed function %r (%d MB, concurrency %d, max %d instances)",
                    spec.name,
                    spec.memory_mb,
                    spec.concurrency,
                    spec.max_instances,
                )
            else:
                pool.update_spec(spec)
        if spec.min_instances or spec.prewarm or spec.fork_template:
            self._pool(spec.name).reap()  # start the warm ones now, not at the next tick

    def remove(self, name: str) -> None:
        """Stop all instances of the function and forget it (its metrics stay readable)."""
        with self._lock:
            pool = self._pools.pop(name, None)
            if pool is None:
                raise self._unknown(name)
            self._removed[name] = pool
        pool.close()

    def functions(self) -> list[str]:
        with self._lock:
            return sorted(self._pools)

    def spec(self, name: str) -> FunctionSpec:
        return copy.deepcopy(self._pool(name).spec)

    # -- invocation ------------------------------------------------------------------------

    def invoke(self, name: str, value: dict, *, timeout: float = 60.0, model: str | None = None) -> dict:
        """Run `value` on the function; cold-starts, queues, retries once after a crash.

        `model` is accepted for the protocol and not used: this platform's scheduling is the
        same for every model (the packer adds affinity on top). Raises ActionError if the
        action answered `{"error": ...}`, PlatformError otherwise (codes: unknown_function,
        busy, start_failed, instance_crashed, timeout).
        """
        return dispatch.invoke(self._pool(name), value, timeout)

    def invoke_instance(self, name: str, instance_id: str, value: dict, *, timeout: float = 60.0) -> dict:
        """Run `value` on one given instance (waits for a free slot on it; no crash retry)."""
        return dispatch.invoke(self._pool(name), value, timeout, instance_id=instance_id)

    def scale(self, name: str, *, min_instances: int | None = None, max_instances: int | None = None) -> None:
        """Change the instance bounds (a scaling-only re-deploy: running instances stay)."""
        spec = self.spec(name)
        if min_instances is not None:
            spec.min_instances = min_instances
        if max_instances is not None:
            spec.max_instances = max_instances
        self.deploy(spec)

    def unload(self, name: str, model: str) -> int:
        """Send the routing's unload request for `model` to every ready instance; returns how
        many answered. 0 without an unload request (the runtime manages its own cache)."""
        with self._lock:
            routing = self._routing.get(name)
        body = routing.unload_request(model) if routing is not None else None
        if body is None:
            self._pool(name)  # still refuse unknown functions
            return 0
        done = 0
        for info in self.instances(name):
            if info.state != "ready":
                continue
            try:
                self.invoke_instance(name, info.id, dict(body), timeout=10.0)
                done += 1
            except PlatformError as e:
                log.warning("unload of %r on %s failed: %s", model, info.id, e.code)
        return done

    # -- instances -------------------------------------------------------------------------

    def instances(self, name: str) -> list[InstanceInfo]:
        """The function's serving instances (not the warm pool's spares: see `spares`)."""
        return self._pool(name).infos()

    def spares(self, name: str) -> list[InstanceInfo]:
        """The warm pool's spare instances of the function (initialised, taking no request)."""
        return self._pool(name).spare_infos()

    def template_pid(self, name: str) -> int | None:
        """The pid of the function's fork template, if it has one running."""
        return self._pool(name).template_pid()

    def start_instance(self, name: str) -> str:
        """Cold-start one instance now (within max_instances); blocks until /init is done."""
        return self._pool(name).start_instance()

    def stop_instance(self, name: str, instance_id: str, *, drain_s: float = 10.0) -> None:
        """Stop routing to the instance, let its in-flight requests finish (up to `drain_s`)."""
        self._pool(name).stop_instance(instance_id, drain_s=drain_s)

    def set_keep_alive(self, name: str, instance_id: str, seconds: float) -> None:
        """Override the idle timeout of one instance (the packer learns keep-alives per model)."""
        self._pool(name).set_keep_alive(instance_id, seconds)

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self, name: str | None = None, *, raw: bool = False) -> dict[str, Any]:
        """JSON-safe metrics of one function, or `{"functions": {...}, "totals": {...}}`.

        Per function: cold_starts, warm_hits, cold_hits, requests, outcomes, crashes, retries,
        cold_start_ms / queue_ms / exec_ms summaries (count, mean, p50, p90, p99, max),
        instances, peak_instances, instance_timeline [[t, n]] (t = seconds since the platform
        started), instance_seconds and gb_seconds (memory_mb/1024 × lifetime, live instances up
        to now), plus the current queued/inflight/starting/ready counts.
        """
        if name is not None:
            return self._function_metrics(name, raw)
        with self._lock:
            names = sorted(set(self._pools) | set(self._removed))
        per = {n: self._function_metrics(n, raw) for n in names}
        return {
            "started_at": self._origin_wall,
            "uptime_s": round(time.monotonic() - self._origin, 3),
            "functions": per,
            "memory_enforcement": self.memory_enforcement,
            "totals": totals(per),
        }

    def _function_metrics(self, name: str, raw: bool) -> dict[str, Any]:
        with self._lock:
            pool = self._pools.get(name)
            removed = pool is None
            pool = pool or self._removed.get(name)
        if pool is None:
            raise self._unknown(name)
        out = pool.metrics.snapshot(raw=raw)
        out.update(pool.state())
        out["removed"] = removed
        out["memory_mb"] = pool.spec.memory_mb
        out["memory_enforcement"] = self.memory_enforcement
        out["prewarm"] = pool.spec.prewarm
        out["fork_template"] = pool.spec.fork_template
        return out

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the reaper and every instance. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools = list(self._pools.values())
            self._removed.update(self._pools)
            self._pools.clear()
        self._stop.set()
        self._reaper.join(timeout=5.0)
        for pool in pools:
            pool.close()
        if self._enforcer is not None:
            self._enforcer.close()
        self._finalizer.detach()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalPlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _next_id(self) -> int:
        with self._ids_lock:
            return next(self._ids)

    def _pool(self, name: str) -> FunctionPool:
        with self._lock:
            self._check_open()
            pool = self._pools.get(name)
        if pool is None:
            raise self._unknown(name)
        return pool

    def _check_open(self) -> None:
        if self._closed:
            raise PlatformError("closed", "the platform is closed")

    def _unknown(self, name: str) -> PlatformError:
        with self._lock:
            known = ", ".join(sorted(self._pools)) or "none"
        return PlatformError("unknown_function", f"no function {name!r} is deployed (deployed: {known})")

    def _reap_once(self) -> None:
        with self._lock:
            pools = list(self._pools.values())
        for pool in pools:
            try:
                pool.reap()
            except Exception:  # the reaper must survive anything one function does
                log.exception("reaping function %r failed", pool.name)


def _reap_loop(ref: weakref.ref[LocalPlatform], stop: threading.Event, interval: float) -> None:
    """The reaper holds only a weak reference, so an unclosed platform can still be collected
    (its finalizer then kills the instances)."""
    while not stop.wait(interval):
        platform = ref()
        if platform is None:
            return
        platform._reap_once()
        del platform


def _close_pools(pools: dict[str, FunctionPool], stop: threading.Event, enforcer: Any = None) -> None:
    """Finalizer: kill instances of a platform that was never closed (no orphan processes) and
    remove its memory cgroups."""
    stop.set()
    for pool in list(pools.values()):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            pool.close()
    if enforcer is not None:
        with contextlib.suppress(Exception):
            enforcer.close()
