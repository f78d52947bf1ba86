"""`sesemi`: SeSeMI's FnPacker, rule for rule (the second baseline).

Reproduces nusdbsystem/SeSeMI fnpacker/fnpack/controller.go (PickFnInstance, steal_func,
check_busy_or_exclusive, ReleaseAndUpdateStats) and stats.go (DefaultModelStats):

- a pool of N slots; slot i is one instance, started on first use, stopped by the platform's
  fixed idle timeout;
- a request for a model with no request in flight ("new or idle") takes the lowest-index slot
  that is not busy and not exclusively claimed by another model; taking it clears the slot's
  claim; none available -> rejected ("all busy"), as FnPacker does;
- the second concurrent request of a model claims its slot; the third and later go there too;
- a claim lapses once its model has been idle for 2x its last execution time (time since the
  model's last call ended >= 2 * exec time);
- a slot is busy while its model has a request in flight, so an instance never serves two models
  at once; the runtime holds a single model, so switching models is a cold model load.

One deliberate difference: FnPacker skips ReleaseAndUpdateStats when an invocation fails, so the
model's in-use count and the slot's busy flag leak forever. Here failures release (Policy.complete).
"""

from __future__ import annotations

from dataclasses import dataclass

from veil.packer.policies.base import Policy
from veil.packer.state import Decision, PoolSpec, Reject, Route


@dataclass
class _ModelStats:
    """stats.go's DefaultModelStats: end of the last call and the last execution time."""

    last_call: float | None = None
    exec_time: float = 0.0


class SeSeMIPolicy(Policy):
    """SeSeMI's FnPacker over `pool_size` single-model instances."""

    name = "sesemi"

    def __init__(self, spec: PoolSpec, pool_size: int = 8) -> None:
        super().__init__(spec)
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.pool_size = pool_size
        self.claims: list[str] = [""] * pool_size  # FPEntry.funcs
        self.busy: list[bool] = [False] * pool_size
        self.slot_instance: list[str | None] = [None] * pool_size
        self.mapping: dict[str, int] = {}
        self.in_use: dict[str, int] = {}
        self.stats: dict[str, _ModelStats] = {}

    def _unavailable(self, idx: int, candidate: str, now: float) -> bool:
        """check_busy_or_exclusive: busy, or claimed by another model whose claim holds."""
        if self.busy[idx]:
            return True
        owner = self.claims[idx]
        if owner in ("", candidate):
            return False
        stats = self.stats[owner]
        since = float("inf") if stats.last_call is None else now - stats.last_call
        return since < 2 * stats.exec_time

    def _steal(self, model: str, now: float) -> int:
        for idx in range(self.pool_size):
            if not self._unavailable(idx, model, now):
                self.claims[idx] = ""
                self.busy[idx] = True
                return idx
        return -1

    def route(self, model: str, now: float) -> Decision:
        self.stats.setdefault(model, _ModelStats())
        count = self.in_use.get(model, 0) + 1
        self.in_use[model] = count
        if count == 2:
            idx = self.mapping[model]
            self.claims[idx] = model
        elif count > 2:
            idx = self.mapping[model]
        else:
            idx = self._steal(model, now)
            if idx == -1:
                self.in_use[model] = count - 1
                return Reject(model, "all busy")
            self.mapping[model] = idx
        return self._route_to_slot(idx, model, now)

    def _route_to_slot(self, idx: int, model: str, now: float) -> Route:
        inst_id = self.slot_instance[idx]
        inst = self.instances.get(inst_id) if inst_id is not None else None
        start = inst is None
        if inst is None:
            inst = self._new_instance(self.spec.function, now, prefix=f"s{idx}.")
            self.slot_instance[idx] = inst.id
        # SeMIRT keeps a single model: loading another replaces it.
        evict = tuple(m for m in inst.resident if m != model)
        return self._admit(inst, model, now, start=start, evict=evict)

    def _on_complete(self, route: Route, now: float, exec_s: float, ok: bool) -> None:
        stats = self.stats.setdefault(route.model, _ModelStats())
        stats.exec_time = exec_s
        # UpdateStats: only a call that started after the last one ended moves last_call.
        if stats.last_call is None or route.at > stats.last_call:
            stats.last_call = now
        count = max(0, self.in_use.get(route.model, 0) - 1)
        self.in_use[route.model] = count
        if count == 0 and route.model in self.mapping:
            self.busy[self.mapping[route.model]] = False

    def _drop(self, instance: str) -> None:
        super()._drop(instance)
        for idx, inst_id in enumerate(self.slot_instance):
            if inst_id == instance:
                self.slot_instance[idx] = None

    def snapshot(self) -> dict:
        snap = super().snapshot()
        snap["slots"] = [
            {"claim": c, "busy": b, "instance": i}
            for c, b, i in zip(self.claims, self.busy, self.slot_instance, strict=True)
        ]
        return snap
