"""The interface every packing policy implements, and the bookkeeping they share.

A policy owns its view of the cluster (`self.instances`). The executor (simulator or `Packer`)
calls, in order: `route` when a request arrives; `started` when an instance the policy asked for
is up (or failed to start); `complete` when the request finished, successfully or not; `tick`
whenever `next_deadline()` is reached, executing the `Stop`/`Unload` actions it returns; `lost`
when an instance vanished behind the policy's back. Every call takes `now`; policies never read
a clock. Not thread-safe by itself: the executor serialises calls (the Packer holds one lock).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from veil.packer.state import Action, Decision, Instance, PoolSpec, Route, Stop


class Policy(ABC):
    """Routing and keep-alive decisions over an abstract pool of instances."""

    name: str = "abstract"

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.instances: dict[str, Instance] = {}
        self._seq = 0

    # -- the executor's entry points -------------------------------------------------------

    @abstractmethod
    def route(self, model: str, now: float) -> Decision:
        """Pick an instance for one request for `model` (or refuse it)."""

    def complete(self, route: Route, now: float, exec_s: float, ok: bool) -> None:
        """The request `route` finished. Success or failure, its slot is released: a failed
        invocation must never leave a model or an instance marked busy (SeSeMI's FnPacker
        skips the release on errors and leaks the slot)."""
        inst = self.instances.get(route.instance)
        if inst is not None:
            was_loading = route.model in inst.loading
            inst.release(route.model, now)
            if ok:
                inst.loading.discard(route.model)
            elif was_loading and inst.model_inflight(route.model) == 0:
                # A failed first request may have left the model unloaded: forget it.
                inst.loading.discard(route.model)
                inst.resident.pop(route.model, None)
        self._on_complete(route, now, exec_s, ok)

    def started(self, instance: str, now: float, ok: bool) -> None:
        """The instance the policy asked for is up (`ok`) or could not start."""
        inst = self.instances.get(instance)
        if inst is None:
            return
        if ok:
            inst.ready = True
        else:
            self._drop(instance)

    def adopt(
        self,
        instance: str,
        now: float,
        *,
        capacity: int | None = None,
        resident: tuple[str, ...] = (),
        seq: int | None = None,
    ) -> Instance:
        """Take in a ready instance the executor did not ask for (a platform's replica that its
        own autoscaler started): the policy routes to it from now on. `resident` are models it
        is known to hold already; `seq` keeps its age rank when it is taken in again (ties go
        to lower ranks, i.e. older instances)."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        inst = Instance(
            id=instance,
            function=self.spec.function,
            capacity=self.spec.capacity if capacity is None else capacity,
            memory_mb=self.spec.memory_mb,
            created_at=now,
            seq=seq,
            ready=True,
            last_used=now,
        )
        for model in resident:
            inst.resident[model] = now
        self.instances[instance] = inst
        return inst

    def lost(self, instance: str, now: float) -> None:
        """The instance disappeared (crashed, reaped by the platform): forget it."""
        self._drop(instance)

    def tick(self, now: float) -> list[Action]:
        """Actions due at `now`: by default stop instances idle for the fixed keep-alive."""
        actions: list[Action] = []
        for inst in list(self.instances.values()):
            if inst.ready and inst.total_inflight == 0 and now >= self.instance_expiry(inst):
                actions.append(Stop(inst.id, inst.function))
                self._drop(inst.id)
        return actions

    def next_deadline(self) -> float | None:
        """The earliest time `tick` may have something to do (None: nothing pending)."""
        times = [self.instance_expiry(i) for i in self.instances.values() if i.ready and i.total_inflight == 0]
        return min(times) if times else None

    # -- helpers for subclasses ------------------------------------------------------------

    def instance_expiry(self, inst: Instance) -> float:
        """When an idle instance is stopped: the platform's fixed idle timeout (baselines)."""
        return inst.last_used + self.spec.idle_timeout_s

    def _on_complete(self, route: Route, now: float, exec_s: float, ok: bool) -> None:  # noqa: B027
        """Subclass hook after the shared release (default: nothing to learn)."""

    def _new_instance(self, function: str, now: float, prefix: str = "i") -> Instance:
        self._seq += 1
        inst = Instance(
            id=f"{prefix}{self._seq}",
            function=function,
            capacity=self.spec.capacity,
            memory_mb=self.spec.memory_mb,
            created_at=now,
            seq=self._seq,
            last_used=now,
        )
        self.instances[inst.id] = inst
        return inst

    def _drop(self, instance: str) -> None:
        self.instances.pop(instance, None)

    def _admit(
        self,
        inst: Instance,
        model: str,
        now: float,
        *,
        start: bool = False,
        evict: tuple[str, ...] = (),
    ) -> Route:
        """Record the admission of a request and build its Route (cold if anything loads)."""
        for gone in evict:
            inst.resident.pop(gone, None)
            inst.loading.discard(gone)
        load = model not in inst.resident
        cold = start or load or not inst.ready or model in inst.loading
        if load:
            inst.loading.add(model)
        inst.admit(model, now)
        return Route(
            model=model,
            instance=inst.id,
            function=inst.function,
            at=now,
            start=start,
            load=load,
            cold=cold,
            evict=evict,
        )

    def snapshot(self) -> dict:
        """JSON-safe view for stats and debugging."""
        return {
            "policy": self.name,
            "instances": {
                i.id: {
                    "function": i.function,
                    "ready": i.ready,
                    "inflight": dict(i.inflight),
                    "resident": list(i.resident),
                }
                for i in self.instances.values()
            },
        }
