"""`Packer`: executes a packing policy's decisions on a real platform.

The gateway calls `Packer.invoke(model, value)`. Under one lock the policy decides (`route`);
outside it the calling thread starts the instance if the decision created one
(`start_instance`), sends evictions if the runtime supports an unload request, then runs the
request on the chosen instance (`invoke_instance`, which waits for a free slot). Whatever
happens, the policy hears `complete` (a failed invocation releases its slot). A ticker thread
applies the policy's keep-alive decisions (`stop_instance`, unloads) at its deadlines; the
platform's own idle timeout is set long (`set_keep_alive`) as a backstop only, so the policy,
not the platform, decides when instances go.

On a platform that places requests by model itself (`Platform.routes_models`, e.g. Ray
Serve), the same policy runs inside the platform's request router instead: the packer deploys
the function with the policy's name and memory model and passes the model with each invoke
(`veil.packer.routed`). The packer only speaks `veil.platform.protocol`; it never asks which
platform it has.

Models are planned at their real size (`veil.packer.sizes`): the sealed size from the store
(the template's `init_value["store"]`, or `model_size_mb`), then the resident size measured on
the instance after the model's first load, and the runtime's own base (its resident set before
its first model, when that is more than `base_mb`); so models whose sum exceeds an instance's
memory are never placed together. A request whose instance vanished before it was sent (crashed, stopped
for memory, killed as unresponsive) is placed once more, on another instance.

Thread-safe: any number of threads may call `invoke` concurrently.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from veil.packer.metrics import InstanceSpan, RequestRecord, summarize, timeline
from veil.packer.policies import make_policy
from veil.packer.policies.base import Policy
from veil.packer.routed import RoutedExecutor, unload_routing
from veil.packer.sizes import ModelSizes, store_sealed_mb
from veil.packer.state import PoolSpec, Reject, Route, Stop, Unload
from veil.platform import FunctionSpec, PlatformError
from veil.platform.protocol import InstanceControl, Platform, Routing, routes_models

log = logging.getLogger("veil.packer")

_POOL_KEYS = ("base_mb", "model_mb", "default_model_mb", "max_instances")
#: codes of a failure that means the chosen instance is gone (crashed, out of memory, killed)
_GONE = ("instance_crashed", "unknown_instance", "out_of_memory")


class PackerError(PlatformError):
    """The packer itself refused a request (`busy`: no instance can take it)."""


class _Handle:
    """The platform side of one policy instance: its id once started, and a readiness latch."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.platform_id: str | None = None
        self.ready = threading.Event()
        self.error: PlatformError | None = None


class Packer:
    """Routes each request for a model to an instance chosen by a packing policy.

    `policy`: "veil" (default), "sesemi" or "per-model". Options: `base_mb`, `model_mb`
    (dict model -> MB), `default_model_mb`, `max_instances` shape the pool; `pool_size`
    (sesemi) and `keepalive` (veil) go to the policy; `unload_value(model) -> dict` builds the
    request that makes an instance drop a model (None: the runtime manages its own cache);
    `exec_time(result) -> seconds | None` reads the runtime's service time from its answer
    (None: the wall time of the invocation, which includes waiting for a slot);
    `clock` (default time.monotonic) is the time source handed to the policy;
    `model_size_mb(model) -> MB | None` gives a model's sealed size (default: read from the
    store named by the template's init value, if any; False: plan with the given sizes only).

    `platform` is any `Platform`; one that does not route by model must also offer
    `InstanceControl` (the packer then starts, targets and stops instances itself).
    """

    def __init__(
        self,
        platform: Platform | InstanceControl,
        template: FunctionSpec,
        policy: str = "veil",
        **options: Any,
    ) -> None:
        self.platform: Any = platform
        self.template = copy.deepcopy(template)
        self._clock: Callable[[], float] = options.pop("clock", time.monotonic)
        self._unload_value: Callable[[str], dict] | None = options.pop("unload_value", None)
        self._exec_time: Callable[[dict], float | None] | None = options.pop("exec_time", None)
        sealed = options.pop("model_size_mb", None)
        store = template.init_value.get("store") if isinstance(template.init_value, dict) else None
        if sealed is None and isinstance(store, str):
            sealed = store_sealed_mb(store)
        self.sizes = ModelSizes(sealed or None)
        pool_opts = {k: options.pop(k) for k in _POOL_KEYS if k in options}
        pool_opts.setdefault("max_instances", template.max_instances)
        spec = PoolSpec(
            function=template.name,
            capacity=template.concurrency,
            memory_mb=float(template.memory_mb),
            idle_timeout_s=template.idle_timeout_s,
            can_unload=self._unload_value is not None,
            **pool_opts,
        )
        self._routed: RoutedExecutor | None = None
        if routes_models(platform):
            # The platform's router runs the policy; ours is built only to check its options.
            if policy != "platform":
                make_policy(policy, spec, **options)
            unload, key = unload_routing(self._unload_value)
            routing = Routing(
                policy=policy,
                base_mb=spec.base_mb,
                default_model_mb=spec.default_model_mb,
                model_mb=dict(spec.model_mb),
                unload_value=unload,
                unload_key=key,
            )
            self._routed = RoutedExecutor(platform, template, routing, clock=self._clock)  # type: ignore[arg-type]
            self.policy = make_policy("veil", spec)  # placeholder view: no instances are placed here
            self._closed = False
            self._lock = threading.Lock()
            return
        self.policy: Policy = make_policy(policy, spec, **options)
        self._bound = max(spec.max_instances, getattr(self.policy, "pool_size", 0))
        # The platform must not reap before the policy does: its keep-alive is only a backstop.
        self._backstop_s = 2 * template.idle_timeout_s + 60.0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._handles: dict[str, _Handle] = {}
        self._deployed: set[str] = set()
        self._records: list[RequestRecord] = []
        self._spans: dict[str, InstanceSpan] = {}
        self._origin = self._clock()
        self._closed = False
        self._ticker_due = 0.0  # when the ticker wakes next on its own (under the lock)
        self._ticker = threading.Thread(target=self._tick_loop, name="veil-packer-ticker", daemon=True)
        self._ticker.start()

    # -- requests ----------------------------------------------------------------------------

    def invoke(self, model: str, value: dict, *, timeout: float = 60.0) -> dict:
        """Run `value` for `model` on the instance the policy picks; raises PlatformError
        (ActionError if the action answered an error, PackerError "busy" if refused)."""
        if self._routed is not None:
            if self._closed:
                raise PackerError("closed", "the packer is closed")
            return self._routed.invoke(model, value, timeout=timeout)
        t0 = self._clock()
        deadline = t0 + timeout
        planned = self.sizes.lookup(model)  # outside the lock: the store may be remote
        try:
            return self._invoke_once(model, value, t0, deadline, planned, first=True)
        except PlatformError as exc:
            if exc.code not in _GONE or exc.sent is not False or self._clock() >= deadline:
                raise
            # its instance went away before it got the request: nothing ran, place it again
            return self._invoke_once(model, value, t0, deadline, planned, first=False)

    def _invoke_once(
        self, model: str, value: dict, t0: float, deadline: float, planned: float | None, *, first: bool
    ) -> dict:
        with self._lock:
            if self._closed:
                raise PackerError("closed", "the packer is closed")
            if planned is not None:
                self.policy.spec.model_mb[model] = planned
            decision = self.policy.route(model, t0) if first else self._reroute(model)
            if isinstance(decision, Reject):
                self._records.append(RequestRecord(t0 - self._origin, model, 0.0, False, False, "", "busy"))
                raise PackerError("busy", f"model {model!r}: {decision.reason}")
            if decision.start:
                self._handles[decision.instance] = _Handle(decision.function)
                self._spans[decision.instance] = InstanceSpan(
                    decision.instance, decision.function, self.policy.spec.memory_mb, t0 - self._origin
                )
            handle = self._handles[decision.instance]
            placed = self.policy.instances.get(decision.instance)
            alone = placed is not None and len(placed.loading) <= 1  # only then is a growth this model's
            first_model = placed is not None and list(placed.resident) == [model]
            self._nudge()
        ok, exec_s, error = False, 0.0, ""
        rss_before: tuple[float, float | None] | None = None
        try:
            self._ensure_started(decision, handle, deadline)
            self._send_evictions(handle, decision.evict)
            assert handle.platform_id is not None
            if decision.load and alone:
                rss_before = self._rss_mb(handle)
                if first_model and rss_before is not None and rss_before[0] > self.policy.spec.base_mb:
                    # what the runtime holds before any model (interpreter, libraries, caches)
                    with self._lock:
                        self.policy.spec = dataclasses.replace(self.policy.spec, base_mb=round(rss_before[0], 1))
            started = self._clock()
            result = self.platform.invoke_instance(
                handle.function, handle.platform_id, value, timeout=max(0.001, deadline - started)
            )
            exec_s = self._clock() - started
            if self._exec_time is not None:
                # The runtime's own service time excludes the wait for a slot on the instance.
                reported = self._exec_time(result)
                exec_s = exec_s if reported is None else reported
            ok = True
            if rss_before is not None:
                after = self._rss_mb(handle)
                if after is not None:
                    # the steady growth, or the peak's when the load went higher than anything
                    # before it (a load needs more for a moment than the model keeps)
                    peak = after[1] - rss_before[1] if after[1] is not None and rss_before[1] is not None else 0.0
                    self.sizes.measured(model, max(after[0] - rss_before[0], peak))
                    planned_now = self.sizes.planned(model)
                    if planned_now is not None:
                        with self._lock:
                            self.policy.spec.model_mb[model] = planned_now
            return result
        except PlatformError as exc:
            error = exc.code
            if exc.code in _GONE:
                self._forget(decision.instance)
            raise
        finally:
            end = self._clock()
            with self._lock:
                self.policy.complete(decision, end, exec_s, ok)
                self._records.append(
                    RequestRecord(t0 - self._origin, model, end - t0, decision.cold, ok, decision.instance, error)
                )
                self._nudge()

    def _nudge(self) -> None:
        """Wake the ticker only if the policy now has something due before the ticker wakes on
        its own (call with the lock held). Waking it on every request's start and end put two
        thread wake-ups (and the ticker's run for the GIL) on every request's path."""
        deadline = self.policy.next_deadline()
        if deadline is not None and deadline < self._ticker_due:
            self._wake.notify_all()

    def _reroute(self, model: str) -> Route | Reject:
        """Place a request again (its arrival is already recorded by the first placement)."""
        reroute = getattr(self.policy, "reroute", None)
        return reroute(model, self._clock()) if reroute is not None else self.policy.route(model, self._clock())

    def _rss_mb(self, handle: _Handle) -> tuple[float, float | None] | None:
        """The instance's resident set now and its high-water mark (the platform reads them from
        the process)."""
        instances = getattr(self.platform, "instances", None)
        if instances is None:
            return None
        try:
            infos = instances(handle.function)
        except PlatformError:
            return None
        info = next((i for i in infos if i.id == handle.platform_id), None)
        if info is None or info.rss_mb is None:
            return None
        return info.rss_mb, getattr(info, "peak_rss_mb", None)

    def _ensure_started(self, decision: Route, handle: _Handle, deadline: float) -> None:
        if not decision.start:
            if not handle.ready.wait(max(0.0, deadline - self._clock())):
                raise PlatformError("timeout", f"instance {decision.instance} did not start in time")
            if handle.error is not None:
                raise handle.error
            return
        try:
            self._deploy(handle.function)
            handle.platform_id = self.platform.start_instance(handle.function)
            self.platform.set_keep_alive(handle.function, handle.platform_id, self._backstop_s)
        except PlatformError as exc:
            handle.error = exc
            with self._lock:
                self.policy.started(decision.instance, self._clock(), False)
                self._end_span(decision.instance)
            raise
        finally:
            handle.ready.set()
        with self._lock:
            self.policy.started(decision.instance, self._clock(), True)
            self._wake.notify_all()

    def _deploy(self, function: str) -> None:
        with self._lock:
            if function in self._deployed:
                return
            self._deployed.add(function)
        spec = copy.deepcopy(self.template)
        spec.name = function
        spec.min_instances = 0
        spec.max_instances = self._bound
        spec.idle_timeout_s = self._backstop_s
        try:
            self.platform.deploy(spec)
        except PlatformError:
            with self._lock:
                self._deployed.discard(function)
            raise

    def _send_evictions(self, handle: _Handle, models: tuple[str, ...]) -> None:
        if not models or self._unload_value is None or handle.platform_id is None:
            return
        for model in models:
            self._apply(Unload("", handle.function, model), handle)

    # -- keep-alive ----------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = self._clock()
                actions = self.policy.tick(now)
                for action in actions:
                    if isinstance(action, Stop):
                        self._end_span(action.instance)
                work = [
                    (a, self._handles.pop(a.instance, None) if isinstance(a, Stop) else self._handles.get(a.instance))
                    for a in actions
                ]
            for action, handle in work:
                self._apply(action, handle)
            with self._lock:
                if self._closed:
                    return
                deadline = self.policy.next_deadline()
                now = self._clock()
                wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
                if wait > 0:
                    self._ticker_due = now + wait
                    self._wake.wait(wait)
                    self._ticker_due = 0.0  # awake: any change is seen by the next round

    def _apply(self, action: Stop | Unload, handle: _Handle | None) -> None:
        if handle is None or handle.platform_id is None:
            return
        try:
            if isinstance(action, Stop):
                self.platform.stop_instance(handle.function, handle.platform_id)
            elif self._unload_value is not None:
                self.platform.invoke_instance(
                    handle.function, handle.platform_id, self._unload_value(action.model), timeout=10.0
                )
        except PlatformError as exc:
            log.warning("%s on %s failed: %s", type(action).__name__, handle.platform_id, exc.code)

    def _forget(self, instance: str) -> None:
        with self._lock:
            self.policy.lost(instance, self._clock())
            self._handles.pop(instance, None)
            self._end_span(instance)

    def _end_span(self, instance: str) -> None:
        span = self._spans.get(instance)
        if span is not None and span.stopped is None:
            span.stopped = self._clock() - self._origin

    # -- reporting -----------------------------------------------------------------------------

    def records(self) -> list[RequestRecord]:
        if self._routed is not None:
            return self._routed.records()
        with self._lock:
            return list(self._records)

    def spans(self) -> list[InstanceSpan]:
        if self._routed is not None:
            return []  # the platform's instances are its own; see platform.metrics()
        with self._lock:
            return [copy.copy(s) for s in self._spans.values()]

    def stats(self) -> dict:
        """Figures of the run so far (see veil.packer.metrics) plus the platform's own GB-s."""
        if self._routed is not None:
            return self._routed_stats(self._routed)
        with self._lock:
            end = self._clock() - self._origin
            out = summarize(self._records, list(self._spans.values()), end)
            out["policy"] = self.policy.name
            out["instances_now"] = len(self._handles)
            out["model_sizes"] = self.sizes.snapshot()
            out["instance_timeline"] = [[round(t, 3), n] for t, n in timeline(list(self._spans.values()), end)]
            functions = sorted(self._deployed)
        platform_gb_s = 0.0
        for function in functions:
            with contextlib.suppress(PlatformError):
                platform_gb_s += self.platform.metrics(function)["gb_seconds"]
        out["platform_gb_s"] = round(platform_gb_s, 3)
        return out

    def _routed_stats(self, routed: RoutedExecutor) -> dict:
        """On a model-routing platform the instances are the platform's: GB-s and instance
        counts come from its metrics, latencies from this packer's records."""
        out = summarize(routed.records(), [], routed.elapsed())
        out["policy"] = routed.routing.policy
        m: dict[str, Any] = {}
        with contextlib.suppress(PlatformError):
            m = self.platform.metrics(routed.function)
        out["platform_gb_s"] = round(float(m.get("gb_seconds", 0.0)), 3)
        out["gb_s"] = out["platform_gb_s"]
        out["max_instances"] = int(m.get("peak_instances", 0))
        out["instances_started"] = int(m.get("cold_starts", 0))
        out["instances_now"] = int(m.get("instances", 0))
        return out

    def close(self) -> None:
        """Stop the ticker and every instance this packer started. Idempotent."""
        if self._routed is not None:
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles.items())
            self._handles.clear()
            for instance, _ in handles:
                self._end_span(instance)
            self._wake.notify_all()
        self._ticker.join(timeout=5.0)
        for _, handle in handles:
            if handle.platform_id is not None:
                with contextlib.suppress(PlatformError):
                    self.platform.stop_instance(handle.function, handle.platform_id, drain_s=2.0)

    def __enter__(self) -> Packer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
