"""`RayPlatform`: Veil's `Platform` on a Ray cluster, through Ray Serve.

Each function is a Serve application of one deployment (`replica.VeilReplica`: one runtime
subprocess per replica) with autoscaling from zero, per-replica concurrency and model
multiplexing; requests go through a `DeploymentHandle` held by this process (no Serve HTTP
proxy is started: nothing listens for Serve beyond Ray's own ports). With `Routing("veil")`
the handle's request router is Veil's packing policy (`veil.packer.ray_router.VeilRequestRouter`), otherwise
Serve's default multiplex-aware router: the baseline.

Warm requests take a shorter way (`direct`): with Veil's router, a request that the policy places
on a running replica holding its model with a free slot is sent to that replica's own gRPC
method from the calling thread, skipping Serve's routing hop (counted in the handle's
autoscaling metrics all the same); cold, queued and model-less requests take the handle.

Errors are the local platform's: a replica answers plain dicts (`wire`), rebuilt here into the
same `PlatformError` / `ActionError`; Ray's own failures are mapped to Veil codes (back-pressure
-> `busy`, a replica that died under the request -> retried once, then `instance_crashed`, no
answer in time -> `timeout`) with messages that never carry a Ray traceback.

    platform = RayPlatform(address="127.0.0.2:6379", node_ip="127.0.0.2")
    platform.deploy(FunctionSpec("veil-tee", [sys.executable, "-m", "veil.runtime"], ...),
                    routing=Routing("veil"))
    platform.invoke("veil-tee", {"envelope": ...}, model="m1")
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from veil.platform.errors import PlatformError
from veil.platform.metrics import FunctionMetrics, totals
from veil.platform.protocol import Routing
from veil.platform.ray_serve import wire
from veil.platform.ray_serve.direct import DirectFailed, DirectPath, DirectReplicaGone, DirectTimeout, Miss
from veil.platform.ray_serve.options import RayOptions, uses_veil_router
from veil.platform.ray_serve.replica import build_app
from veil.platform.spec import FunctionSpec

log = logging.getLogger("veil.platform.ray_serve")

#: How often (at most) the replicas of a warm-pool function are asked what they hold (by the
#: poller; by `metrics()` calls), and how long they may take to answer (seconds).
RESIDENCY_POLL_S = 0.5
RESIDENCY_FORCED_S = 0.1
RESIDENCY_TIMEOUT_S = 2.0

#: Replica states that hold resources (billed), as Serve reports them.
_BILLED = {"STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION", "STOPPING"}


@dataclass
class _Function:
    spec: FunctionSpec
    routing: Routing | None
    handle: Any
    metrics: FunctionMetrics
    by_model: dict[str | None, Any] = field(default_factory=dict)  # handle options per model id
    replicas: dict[str, str] = field(default_factory=dict)  # replica id -> state, as last seen
    ever_running: set[str] = field(default_factory=set)
    removed: bool = False
    pooled: set[str] = field(default_factory=set)  # replicas billed as the warm pool (no model)
    residency_at: float = 0.0  # when the replicas last reported what they hold (monotonic)
    direct: DirectPath | None = None  # warm requests straight to their replica (Veil's router)


class RayPlatform:
    """Deploy, invoke, scale, unload and meter Veil functions on Ray Serve."""

    kind = "ray"
    routes_models = True

    def __init__(
        self,
        *,
        address: str | None = None,
        node_ip: str | None = None,
        options: RayOptions | None = None,
        namespace: str = "veil",
        poll_interval_s: float = 0.25,
        ray_init: dict[str, Any] | None = None,
        app_prefix: str = "",
        direct_path: bool = True,
    ) -> None:
        """Connect to the Ray cluster at `address` (None: start a local one) as a driver on
        the node whose IP is `node_ip` (keep it inside 127.0.0.0/8 on a single machine: Ray
        otherwise replaces 127.0.0.1 with the host's own address). `app_prefix` goes before
        each function's name to make its Serve application's name, so that several
        deployments can share one cluster (Serve's application names are cluster-wide).
        `direct_path`: send warm requests placed by Veil's router straight to their replica
        (`direct`); False: every request through the handle (the comparison baseline)."""
        self.options = options or RayOptions()
        self.app_prefix = app_prefix
        self.direct_path = direct_path
        self._on_close: list[Callable[[], None]] = []
        self.cluster: Any = None  # the LocalRayCluster this platform owns, if launch started one
        self._connected = False  # we called ray.init (disconnect on close)
        self._owns_ray = False  # ...and it started a local cluster (shut Serve and Ray down too)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": False, **(ray_init or {})}
            if node_ip is not None:
                kwargs["_node_ip_address"] = node_ip
            if address is None:
                kwargs.setdefault("include_dashboard", False)
            ray.init(address=address, **kwargs)
            self._connected = True
            self._owns_ray = address is None
        serve.start(proxy_location="Disabled")
        self._origin = time.monotonic()
        self._lock = threading.RLock()
        # One poll at a time: a slow poll applied after a newer one would re-add a replica the
        # newer one saw gone (billing it twice).
        self._poll_lock = threading.Lock()
        self._functions: dict[str, _Function] = {}
        self._closed = False
        self._stop = threading.Event()
        self._poll_interval = poll_interval_s
        self._poller = threading.Thread(target=self._poll_loop, name="veil-ray-poller", daemon=True)
        self._poller.start()

    # -- functions ---------------------------------------------------------------------------

    def deploy(self, spec: FunctionSpec, *, routing: Routing | None = None) -> None:
        """Create or update the function's Serve application. Same spec: nothing happens; only
        scaling knobs changed: Serve updates the running replicas in place; a new command,
        env, init value, memory or routing: Serve replaces the replicas."""
        spec = copy.deepcopy(spec)
        spec.validate()
        with self._lock:
            self._check_open()
            current = self._functions.get(spec.name)
            if current is not None and not current.removed and current.spec == spec and (current.routing == routing):
                return
        app = build_app(spec, routing, self.options)
        try:
            fresh = serve.run(app, name=self.app_name(spec.name), route_prefix=None)
        except RayServeException as e:
            raise PlatformError("start_failed", f"function {spec.name!r}: Serve refused the deployment: {e}") from None
        with self._lock:
            old = self._functions.get(spec.name)
            keep = old is not None and not old.removed and old.routing == routing
            # Keep the handle across updates: its router holds the routing policy's state
            # (what is warm where, learned keep-alives); a new handle would start from nothing.
            handle = old.handle if keep and old is not None else fresh
            metrics = old.metrics if old is not None and not old.removed else FunctionMetrics(spec.name, self._origin)
            fn = _Function(spec, routing, handle, metrics)
            if old is not None and not old.removed:
                fn.replicas, fn.ever_running, fn.pooled = old.replicas, old.ever_running, old.pooled
            if self.direct_path and uses_veil_router(routing):
                fn.direct = old.direct if keep and old is not None and old.direct is not None else DirectPath(handle)
            self._functions[spec.name] = fn
        if old is not None and not keep:
            _shutdown_handle(old.handle)
            if old.direct is not None:
                old.direct.close()
        log.info(
            "deployed %r on Ray Serve (router %s, %d MB, concurrency %d, %d..%d replicas)",
            spec.name,
            routing.policy if routing is not None else "ray",
            spec.memory_mb,
            spec.concurrency,
            spec.min_instances,
            spec.max_instances,
        )

    def scale(self, name: str, *, min_instances: int | None = None, max_instances: int | None = None) -> None:
        fn = self._fn(name)
        spec = copy.deepcopy(fn.spec)
        if min_instances is not None:
            spec.min_instances = min_instances
        if max_instances is not None:
            spec.max_instances = max_instances
        self.deploy(spec, routing=fn.routing)

    def remove(self, name: str) -> None:
        fn = self._fn(name)
        _shutdown_handle(fn.handle)
        if fn.direct is not None:
            fn.direct.close()
        with contextlib.suppress(RayServeException):
            serve.delete(self.app_name(name), _blocking=True)
        with self._lock:
            fn.removed = True
        self._poll_once()

    def functions(self) -> list[str]:
        with self._lock:
            return sorted(n for n, f in self._functions.items() if not f.removed)

    def spec(self, name: str) -> FunctionSpec:
        return copy.deepcopy(self._fn(name).spec)

    # -- invocation --------------------------------------------------------------------------

    def invoke(self, name: str, value: dict, *, timeout: float = 60.0, model: str | None = None) -> dict:
        """Run `value` on the function; `model` is the multiplexed model id the router places
        by. A replica that dies under the request (its Ray worker killed) is retried once."""
        fn = self._fn(name)
        if not isinstance(value, dict):
            raise PlatformError("bad_request", f"function {name!r}: value must be a JSON object", status=400)
        try:
            # encoded once, here: the replica splices these bytes into the runtime's /run body
            payload = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise PlatformError("bad_request", f"function {name!r}: the value is not JSON-serialisable: {e}") from None
        handle = self._handle_for(fn, model)
        t0 = time.monotonic()
        deadline = t0 + timeout
        first: str | None = None
        outcome = "ok"
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PlatformError("timeout", f"function {name!r}: no result within {timeout:.2f} s")
                try:
                    answer = self._attempt(fn, handle, name, model, payload, remaining, retry=first is not None)
                except _ReplicaDied as died:
                    if first is None:
                        first = died.reason
                        fn.metrics.retried()
                        continue
                    raise PlatformError(
                        "instance_crashed",
                        f"function {name!r}: the request failed twice: a replica {first}, and the retry's "
                        f"replica {died.reason}",
                    ) from None
                return wire.result(answer, name)
        except PlatformError as e:
            outcome = e.code
            raise
        finally:
            elapsed = time.monotonic() - t0
            fn.metrics.request_done(cold=False, queue_s=0.0, exec_s=elapsed, outcome=outcome)

    def _handle_for(self, fn: _Function, model: str | None) -> Any:
        """The function's handle with this request's options (one router for all of them)."""
        handle = fn.by_model.get(model)
        if handle is None:
            opts: dict[str, Any] = {}
            if model:
                opts["multiplexed_model_id"] = model
            if self.options.grpc_transport:
                opts["_by_reference"] = False
            handle = fn.handle.options(**opts) if opts else fn.handle
            with self._lock:
                if len(fn.by_model) >= 4096:  # many models: keep the cache bounded
                    fn.by_model.clear()
                fn.by_model[model] = handle
        return handle

    def _attempt(
        self, fn: _Function, handle: Any, name: str, model: str | None, value: bytes, remaining: float, *, retry: bool
    ) -> Any:
        """One try: the direct path for a warm first try, else (or when it declines) the handle.
        A retry always takes the handle: Serve's view settles where the replica that died is."""
        arrived = retry and fn.direct is not None
        if fn.direct is not None and model and not retry:
            try:
                got = fn.direct.call(model, value, remaining)
            except DirectReplicaGone as e:
                raise _ReplicaDied(e.reason) from None
            except DirectTimeout:
                raise PlatformError("timeout", f"function {name!r}: no result within {remaining:.2f} s") from None
            except DirectFailed as e:
                raise PlatformError("platform_error", f"function {name!r}: the replica failed ({e.what})") from None
            if not isinstance(got, Miss):
                return got
            arrived = got.arrived
        return self._call(handle, name, value, remaining, arrived=arrived)

    def _call(self, handle: Any, name: str, value: bytes, remaining: float, *, arrived: bool = False) -> Any:
        """Through the handle. `arrived`: Veil's router counted this request's arrival already
        (the direct path placed it, or an earlier try), so its placement is made as a retry's."""
        if arrived:
            response = handle.remote(value, timeout=remaining, veil={"arrived": True})
        else:
            response = handle.remote(value, timeout=remaining)
        try:
            return response.result(timeout_s=remaining)
        except TimeoutError:
            response.cancel()
            raise PlatformError("timeout", f"function {name!r}: no result within {remaining:.2f} s") from None
        except BackPressureError as e:
            raise PlatformError(
                "busy",
                f"function {name!r} is busy: the queue is full ({e.num_queued_requests} waiting, "
                f"max_queue={e.max_queued_requests})",
            ) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
            raise _ReplicaDied(f"died while running it ({type(e).__name__})") from None
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ActorDiedError):
                raise _ReplicaDied("died while running it (ActorDiedError)") from None
            raise PlatformError(
                "platform_error", f"function {name!r}: the replica failed ({type(e.cause).__name__})"
            ) from None
        except DeploymentUnavailableError:
            raise PlatformError("unknown_function", f"function {name!r} is not deployed on Ray Serve") from None
        except RayServeException as e:
            raise PlatformError("platform_error", f"function {name!r}: Ray Serve failed: {_first_line(e)}") from None

    def unload(self, name: str, model: str) -> int:
        """Broadcast the unload of `model` to every replica; returns how many dropped it."""
        fn = self._fn(name)
        try:
            results = fn.handle.broadcast("unload", model).results(timeout_s=30.0)
        except (TimeoutError, RayServeException, RayActorError) as e:
            raise PlatformError(
                "timeout", f"function {name!r}: unload of {model!r} failed: {type(e).__name__}"
            ) from None
        return sum(1 for r in results if r)

    def replicas(self, name: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every running replica's own report (id, node, worker pid, runtime pid and port,
        models held, starts and crashes): for operators and tests."""
        fn = self._fn(name)
        try:
            return list(fn.handle.broadcast("stats").results(timeout_s=timeout))
        except (TimeoutError, RayServeException, RayActorError) as e:
            raise PlatformError("timeout", f"function {name!r}: replica stats failed: {type(e).__name__}") from None

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self, name: str | None = None, *, raw: bool = False) -> dict[str, Any]:
        """The local platform's metrics keys; instance counts and GB-seconds come from Serve's
        replica list (sampled every `poll_interval_s`, and once more now, so a replica that became
        RUNNING just before this call is counted), cold starts count replicas that reached
        RUNNING, latencies are end to end through the handle (`exec_ms`). With a warm pool
        (`prewarm`), replicas holding no model are billed apart, as the local platform's spares
        (`prewarm_gb_seconds`, `prewarm_gb_s_per_hour`, `spares_ready`, `spares_starting`); one
        that takes a model is a `prewarm_hits` cold start of 0 ms, and a new spare reaching
        RUNNING a `spare_starts` one."""
        with contextlib.suppress(Exception):  # a controller hiccup leaves the last sample
            self._poll_once(residency=True)
        if name is not None:
            return self._function_metrics(name, raw)
        with self._lock:
            names = sorted(self._functions)
        per = {n: self._function_metrics(n, raw) for n in names}
        return {
            "platform": "ray",
            "uptime_s": round(time.monotonic() - self._origin, 3),
            "functions": per,
            "totals": totals(per),
        }

    def _function_metrics(self, name: str, raw: bool) -> dict[str, Any]:
        with self._lock:
            fn = self._functions.get(name)
        if fn is None:
            raise self._unknown(name)
        out = fn.metrics.snapshot(raw=raw)
        with self._lock:
            states = [(s, rid in fn.pooled) for rid, s in fn.replicas.items()]
        starting = ("STARTING", "UPDATING", "RECOVERING")
        out.update(
            {
                "removed": fn.removed,
                "memory_mb": fn.spec.memory_mb,
                "router": fn.routing.policy if fn.routing is not None else "ray",
                "prewarm": fn.spec.prewarm,
                "starting": sum(1 for s, pool in states if s in starting and not pool),
                "ready": sum(1 for s, pool in states if s == "RUNNING" and not pool),
                "draining": sum(1 for s, _ in states if s == "STOPPING"),
                "spares_ready": sum(1 for s, pool in states if s == "RUNNING" and pool),
                "spares_starting": sum(1 for s, pool in states if s in starting and pool),
                # answered over the direct path (`direct`), of `requests`
                "direct_requests": fn.direct.sent if fn.direct is not None else 0,
                "direct_replica_gone": fn.direct.gone if fn.direct is not None else 0,
            }
        )
        return out

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                self._poll_once()
            except Exception:  # the meter must survive a controller hiccup
                log.debug("polling Serve's replica list failed", exc_info=True)

    def _poll_once(self, *, residency: bool = False) -> None:
        """Follow every replica's life from Serve's details: billed from its start until it is
        gone, as the local platform bills from spawn until exit. `residency`: ask the replicas
        of warm-pool functions what they hold now (at most every `RESIDENCY_FORCED_S`; the
        poller every `RESIDENCY_POLL_S`)."""
        with self._poll_lock:
            self._poll_locked()
            self._poll_residency(force=residency)

    def _poll_residency(self, *, force: bool) -> None:
        """Warm pool billing: a replica holding no model is a spare (pool), one holding a model
        is serving. Each replica reports since when (its own clock), so a transition is billed
        when it happened, not when it was polled."""
        with self._lock:
            functions = [f for f in self._functions.values() if f.spec.prewarm and not f.removed]
        for fn in functions:
            now_mono = time.monotonic()
            every = RESIDENCY_FORCED_S if force else RESIDENCY_POLL_S
            if not fn.ever_running or now_mono - fn.residency_at < every:
                continue
            fn.residency_at = now_mono
            try:
                reports = fn.handle.broadcast("residency").results(timeout_s=RESIDENCY_TIMEOUT_S)
            except Exception:  # a replica stopping under the call: next poll
                log.debug("residency poll of %r failed", fn.spec.name, exc_info=True)
                continue
            now_mono, now_wall = time.monotonic(), time.time()
            with self._lock:
                for r in reports:
                    rid = str(r.get("replica_id")) if isinstance(r, dict) else ""
                    if rid not in fn.replicas:
                        continue
                    at = now_mono - max(0.0, now_wall - float(r.get("since") or now_wall))
                    if r.get("holding") and rid in fn.pooled:
                        fn.pooled.discard(rid)
                        fn.metrics.promoted(rid, at)
                    elif not r.get("holding") and rid not in fn.pooled:
                        # back to the pool: its serving billing ends, its idle billing starts
                        fn.metrics.instance_ended(rid, at)
                        fn.metrics.instance_started(rid, fn.spec.memory_mb, at, pool=True)
                        fn.pooled.add(rid)

    def _poll_locked(self) -> None:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return
        # The details as the controller sends them (a dict of its ServeInstanceDetails): read
        # directly, since validating them into pydantic models every poll cost the gateway's
        # process (which also serves requests) milliseconds of CPU a few times a second.
        details = client.get_serve_details() or {}
        now_mono, now_wall = time.monotonic(), time.time()
        with self._lock:
            functions = list(self._functions.items())
        for name, fn in functions:
            seen = _replica_states(details, self.app_name(name), name)
            with self._lock:
                for rid, (state, started) in seen.items():
                    if rid not in fn.replicas:
                        at = now_mono - max(0.0, now_wall - started) if started else now_mono
                        # with a warm pool every replica starts as a spare: it holds no model
                        pool = bool(fn.spec.prewarm)
                        fn.metrics.instance_started(rid, fn.spec.memory_mb, at, pool=pool)
                        if pool:
                            fn.pooled.add(rid)
                    if state == "RUNNING" and rid not in fn.ever_running:
                        fn.ever_running.add(rid)
                        start_s = max(0.0, now_wall - started) if started else 0.0
                        if rid in fn.pooled:
                            fn.metrics.spare_ready(start_s)
                        else:
                            fn.metrics.instance_ready(start_s)
                for rid in [r for r in fn.replicas if r not in seen]:
                    fn.metrics.instance_ended(rid, now_mono)
                    fn.pooled.discard(rid)
                fn.replicas = {rid: state for rid, (state, _) in seen.items()}

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the applications this platform deployed (and Ray, if it started it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = [f for f in self._functions.values() if not f.removed]
            names = [f.spec.name for f in live]
        for f in live:  # routers first: their metrics tasks must not outlive the connection
            _shutdown_handle(f.handle)
            if f.direct is not None:
                f.direct.close()
        for name in names:
            with contextlib.suppress(Exception):
                serve.delete(self.app_name(name), _blocking=True)
        with contextlib.suppress(Exception):
            self._poll_once()
        self._stop.set()
        self._poller.join(timeout=5.0)
        if self._owns_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
        if self._connected:
            ray.shutdown()
        for hook in reversed(self._on_close):
            try:
                hook()
            except Exception:  # every hook runs (a cluster to stop, an environment to restore)
                log.warning("a close hook of the Ray platform failed", exc_info=True)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run `hook` at the end of `close()`, after Ray was disconnected (e.g. stop the local
        Ray cluster started for this platform: `veil.platform.ray_serve.launch`)."""
        self._on_close.append(hook)

    def app_name(self, name: str) -> str:
        """The Serve application (cluster-wide name) of function `name`."""
        return self.app_prefix + name

    def __enter__(self) -> RayPlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _fn(self, name: str) -> _Function:
        with self._lock:
            self._check_open()
            fn = self._functions.get(name)
            if fn is None or fn.removed:
                raise self._unknown(name)
            return fn

    def _check_open(self) -> None:
        if self._closed:
            raise PlatformError("closed", "the platform is closed")

    def _unknown(self, name: str) -> PlatformError:
        known = ", ".join(self.functions()) if not self._closed else ""
        return PlatformError("unknown_function", f"no function {name!r} is deployed (deployed: {known or 'none'})")


def _replica_states(details: dict[str, Any], app: str, deployment: str) -> dict[str, tuple[str, float]]:
    """Billed replicas of one deployment in Serve's details: id -> (state, start time)."""
    apps = details.get("applications") or {}
    deployments = (apps.get(app) or {}).get("deployments") or {}
    out: dict[str, tuple[str, float]] = {}
    for r in (deployments.get(deployment) or {}).get("replicas") or ():
        state = r.get("state")
        state = getattr(state, "value", state)
        if state in _BILLED and r.get("replica_id"):
            out[str(r["replica_id"])] = (str(state), float(r.get("start_time_s") or 0.0))
    return out


class _ReplicaDied(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _shutdown_handle(handle: Any) -> None:
    """Stop a handle's router (and its background metrics tasks)."""
    with contextlib.suppress(Exception):
        handle.shutdown()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
