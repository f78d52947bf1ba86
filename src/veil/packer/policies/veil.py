"""`veil`: Veil's own packing policy.

Routing:
1. an instance where the model is warm (resident) with a free slot, least loaded first;
2. else the least loaded instance with a free slot and memory room, evicting its least recently
   used idle models to make room (never one with requests in flight);
3. else scale out (a new instance) up to `max_instances`.
Each candidate is priced by its expected wait (queue for a slot, rest of an instance start,
model load, learned online from completions) and the cheapest wins, ties going in the order
above: so a model warm only on full instances queues there when that is shorter than a cold
load elsewhere, and a short queue is preferred to an instance start. Evicting a warm model is
priced at its reload (the next request for it pays that), so while the pool may grow, models
too big to share an instance get instances of their own instead of taking turns on one.

Keep-alive is per model, learned from the model's inter-arrival times (`KeepAliveLearner`): an
idle model is unloaded when its window ends and an instance stops once it holds no model, so a
pool shrinks as soon as the models on it are predicted cold instead of after a fixed timeout.
"""

from __future__ import annotations

from veil.packer.keepalive import KeepAliveLearner
from veil.packer.policies.base import Policy
from veil.packer.state import Action, Decision, Instance, PoolSpec, Reject, Route, Stop, Unload


class _Ewma:
    """Exponentially weighted mean with a prior (used before the first sample)."""

    def __init__(self, prior: float, alpha: float = 0.2) -> None:
        self.value = prior
        self.alpha = alpha
        self.seen = False

    def add(self, sample: float) -> None:
        if not self.seen:
            self.value, self.seen = sample, True
        else:
            self.value += self.alpha * (sample - self.value)


class VeilPolicy(Policy):
    """Warm-first, least-loaded, memory-aware packing with learned per-model keep-alive."""

    name = "veil"

    def __init__(
        self,
        spec: PoolSpec,
        keepalive: KeepAliveLearner | None = None,
        *,
        exec_prior_s: float = 0.05,
        load_prior_s: float = 0.5,
        start_prior_s: float = 1.0,
    ) -> None:
        super().__init__(spec)
        self.keepalive = keepalive or KeepAliveLearner(spec.idle_timeout_s)
        self._exec_prior = exec_prior_s
        self._load_prior = load_prior_s
        self._warm: dict[str, _Ewma] = {}
        self._cold: dict[str, _Ewma] = {}
        self._start = _Ewma(start_prior_s)
        self._work: dict[str, float] = {}  # instance -> estimated seconds of admitted work
        self._cost: dict[int, float] = {}  # id(route in flight) -> its share of that work

    # -- cost estimates ----------------------------------------------------------------------

    def exec_estimate(self, model: str) -> float:
        est = self._warm.get(model)
        return est.value if est else self._exec_prior

    def load_estimate(self, model: str) -> float:
        cold = self._cold.get(model)
        if cold is None:
            return self._load_prior
        return max(0.0, cold.value - self.exec_estimate(model))

    # -- routing -----------------------------------------------------------------------------

    def _room(self, inst: Instance, model: str) -> tuple[str, ...] | None:
        """Models to evict (LRU first, idle only) so `model` fits; None if it cannot fit."""
        need = self.spec.size_of(model)
        used = self.spec.base_mb + sum(self.spec.size_of(m) for m in inst.resident)
        if used + need <= inst.memory_mb:
            return ()
        if not self.spec.can_unload:  # the runtime would keep them: an eviction would be fiction
            return None
        evict: list[str] = []
        for victim in inst.resident:  # OrderedDict: least recently used first
            if inst.model_inflight(victim) > 0 or victim in inst.loading:
                continue
            evict.append(victim)
            used -= self.spec.size_of(victim)
            if used + need <= inst.memory_mb:
                return tuple(evict)
        return None

    def _queue_wait(self, inst: Instance, model: str) -> float:
        """Expected wait for a slot on a full instance: the work already admitted to it (warm
        runs, and the loads of models still loading, which dominate during a burst of cold
        requests) spread over its `capacity` slots."""
        if inst.total_inflight < inst.capacity:
            return 0.0
        return self._work.get(inst.id, 0.0) / inst.capacity

    def _admit(
        self,
        inst: Instance,
        model: str,
        now: float,
        *,
        start: bool = False,
        evict: tuple[str, ...] = (),
    ) -> Route:
        route = super()._admit(inst, model, now, start=start, evict=evict)
        cost = self.exec_estimate(model) + (self.load_estimate(model) if route.load else 0.0)
        self._work[inst.id] = self._work.get(inst.id, 0.0) + cost
        self._cost[id(route)] = cost
        return route

    def _start_left(self, inst: Instance, now: float) -> float:
        return 0.0 if inst.ready else max(0.0, inst.created_at + self._start.value - now)

    def route(self, model: str, now: float) -> Decision:
        """Warm first, then least loaded with room, then scale out; among those, the option
        with the lowest expected wait (a short queue on a warm instance beats a cold load, and
        a short queue beats an instance start)."""
        self.keepalive.observe(model, now)
        return self.reroute(model, now)

    def reroute(self, model: str, now: float) -> Decision:
        """Place a request whose arrival was already recorded (an executor retrying the
        placement, e.g. after the instance it chose refused the request for being full)."""
        load = self.load_estimate(model)
        # (expected wait, preference rank, inflight, evictions, seq) -> (instance, evict)
        options: list[tuple[tuple[float, int, int, int, int], Instance, tuple[str, ...]]] = []
        for inst in self.instances.values():
            free = inst.total_inflight < inst.capacity
            wait = self._queue_wait(inst, model) + self._start_left(inst, now)
            if model in inst.resident:
                if free and inst.ready:
                    # Rule 1: warm with a free slot; nothing beats it.
                    options.append(((0.0, 0, inst.total_inflight, 0, inst.seq), inst, ()))
                else:
                    options.append(((wait, 1, inst.total_inflight, 0, inst.seq), inst, ()))
                continue
            evict = self._room(inst, model)
            if evict is None:
                continue
            rank = 2 if free else 3
            reloads = sum(self.load_estimate(victim) for victim in evict)
            key = (wait + load + reloads, rank, inst.total_inflight, len(evict), inst.seq)
            options.append((key, inst, evict))
        if len(self.instances) < self.spec.max_instances:
            scale = (self._start.value + load, 4, 0, 0, self._seq + 1)
            options.append((scale, None, ()))  # type: ignore[arg-type]
        if not options:
            return Reject(model, "no instance has memory room and the pool is at max_instances")
        _, inst, evict = min(options, key=lambda o: o[0])
        if inst is None:
            inst = self._new_instance(self.spec.function, now, prefix="v")
            return self._admit(inst, model, now, start=True)
        return self._admit(inst, model, now, evict=evict)

    # -- feedback ----------------------------------------------------------------------------

    def started(self, instance: str, now: float, ok: bool) -> None:
        inst = self.instances.get(instance)
        if inst is not None and ok:
            self._start.add(now - inst.created_at)
        super().started(instance, now, ok)

    def _on_complete(self, route: Route, now: float, exec_s: float, ok: bool) -> None:
        cost = self._cost.pop(id(route), 0.0)
        if route.instance in self._work:
            self._work[route.instance] = max(0.0, self._work[route.instance] - cost)
        if not ok:
            return
        table = self._cold if route.load else self._warm
        table.setdefault(route.model, _Ewma(exec_s)).add(exec_s)

    # -- keep-alive --------------------------------------------------------------------------

    def _model_deadline(self, inst: Instance, model: str) -> float | None:
        if inst.model_inflight(model) > 0 or model in inst.loading:
            return None
        return inst.resident[model] + self.keepalive.keepalive(model)

    def _drop(self, instance: str) -> None:
        super()._drop(instance)
        self._work.pop(instance, None)

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for inst in list(self.instances.values()):
            if not inst.ready:
                continue
            for model in list(inst.resident):
                deadline = self._model_deadline(inst, model)
                if deadline is not None and now >= deadline:
                    del inst.resident[model]
                    actions.append(Unload(inst.id, inst.function, model))
            if not inst.resident and inst.total_inflight == 0:
                actions.append(Stop(inst.id, inst.function))
                self._drop(inst.id)
        return actions

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for inst in self.instances.values():
            if not inst.ready:
                continue
            if not inst.resident and inst.total_inflight == 0:
                times.append(inst.last_used)
            for model in inst.resident:
                deadline = self._model_deadline(inst, model)
                if deadline is not None:
                    times.append(deadline)
        return min(times) if times else None
