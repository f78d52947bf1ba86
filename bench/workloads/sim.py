"""Discrete-event simulator of the packer: the real policy objects, simulated instances.

Feeds a trace through a `veil.packer` policy exactly as the real `Packer` does (route on arrival,
started when an instance is up, complete when a request ends, tick at the policy's deadlines) and
plays the instances with costs measured on the real platform (`Costs`, see calibrate.py):

- an instance takes `start_s` from the start request until it serves;
- it runs at most `capacity` requests at once, the rest wait FIFO;
- a model not loaded on it costs `load_s[model]` (inside the request's execution); requests for a
  model being loaded wait for that load;
- a warm execution costs a sample from the model's measured warm times (client-seen, so the HTTP
  and packer overheads are included).

What it leaves out (see docs/packer.md for the measured gap): CPU contention between instances
on the same host (the real run has 2 shared cores), process memory growth, and OS jitter.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from veil.packer.metrics import InstanceSpan, RequestRecord, summarize
from veil.packer.policies.base import Policy
from veil.packer.state import Reject, Route, Stop, Unload


@dataclass
class Costs:
    """Cold and warm costs per model, in seconds (measured by calibrate.py)."""

    start_s: float = 1.0
    load_s: dict[str, float] = field(default_factory=dict)
    warm_s: dict[str, list[float]] = field(default_factory=dict)
    model_mb: dict[str, float] = field(default_factory=dict)
    base_mb: float = 80.0
    default_load_s: float = 0.3
    default_warm_s: float = 0.01

    def load(self, model: str) -> float:
        return self.load_s.get(model, self.default_load_s)

    def warm(self, model: str, rng: np.random.Generator) -> float:
        samples = self.warm_s.get(model)
        if not samples:
            return self.default_warm_s
        return float(samples[int(rng.integers(len(samples)))])

    def to_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=1, sort_keys=True))

    @classmethod
    def from_json(cls, path: Path) -> Costs:
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class _Request:
    route: Route
    arrival: float


@dataclass
class _Phys:
    """A simulated instance."""

    capacity: int
    ready: bool = False
    busy: int = 0
    queue: deque = field(default_factory=deque)
    loaded: dict[str, float] = field(default_factory=dict)  # model -> time its load ends


@dataclass
class SimResult:
    requests: list[RequestRecord]
    spans: list[InstanceSpan]
    end: float

    def summary(self) -> dict:
        return summarize(self.requests, self.spans, self.end)


def simulate(
    policy: Policy, times: np.ndarray, models: list[str], costs: Costs, *, seed: int = 0, end: float | None = None
) -> SimResult:
    """Run the trace (arrival `times`, request `models`) under `policy`; deterministic per seed."""
    rng = np.random.default_rng(seed)
    seq = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    for t, m in zip(times, models, strict=True):
        heapq.heappush(events, (float(t), next(seq), "arrive", m))
    phys: dict[str, _Phys] = {}
    spans: dict[str, InstanceSpan] = {}
    records: list[RequestRecord] = []
    tick_at = float("inf")
    now = 0.0

    def begin(inst_id: str, req: _Request, t: float) -> None:
        p = phys[inst_id]
        p.busy += 1
        model = req.route.model
        load_end = p.loaded.get(model)
        if load_end is None:
            load_end = p.loaded[model] = t + costs.load(model)
        start_exec = max(t, load_end)
        done = start_exec + costs.warm(model, rng)
        heapq.heappush(events, (done, next(seq), "done", (inst_id, req, t)))

    def drain(inst_id: str, t: float) -> None:
        p = phys[inst_id]
        while p.ready and p.queue and p.busy < p.capacity:
            begin(inst_id, p.queue.popleft(), t)

    def schedule_tick(t: float) -> None:
        nonlocal tick_at
        deadline = policy.next_deadline()
        if deadline is None:
            return
        deadline = max(deadline, t)
        if deadline < tick_at:
            tick_at = deadline
            heapq.heappush(events, (deadline, next(seq), "tick", None))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            model = str(payload)
            decision = policy.route(model, now)
            if isinstance(decision, Reject):
                records.append(RequestRecord(now, model, 0.0, False, False, "", decision.reason))
            else:
                if decision.start:
                    phys[decision.instance] = _Phys(capacity=policy.spec.capacity)
                    spans[decision.instance] = InstanceSpan(
                        decision.instance, decision.function, policy.spec.memory_mb, now
                    )
                    heapq.heappush(events, (now + costs.start_s, next(seq), "ready", decision.instance))
                p = phys[decision.instance]
                for gone in decision.evict:
                    p.loaded.pop(gone, None)
                p.queue.append(_Request(decision, now))
                drain(decision.instance, now)
        elif kind == "ready":
            inst_id = str(payload)
            phys[inst_id].ready = True
            policy.started(inst_id, now, True)
            drain(inst_id, now)
        elif kind == "done":
            inst_id, req, began = payload  # type: ignore[misc]
            phys[inst_id].busy -= 1
            policy.complete(req.route, now, now - began, True)
            records.append(
                RequestRecord(req.arrival, req.route.model, now - req.arrival, req.route.cold, True, inst_id)
            )
            drain(inst_id, now)
        elif kind == "tick":
            if now < tick_at:
                continue  # superseded by an earlier tick
            tick_at = float("inf")
            for action in policy.tick(now):
                if isinstance(action, Stop):
                    spans[action.instance].stopped = now
                    phys.pop(action.instance, None)
                elif isinstance(action, Unload) and action.instance in phys:
                    phys[action.instance].loaded.pop(action.model, None)
        schedule_tick(now)
        if end is not None and events and all(e[2] == "tick" for e in events) and now >= end:
            break
    final = max(now, end if end is not None else now)
    if end is not None:
        final = max(end, max((r.at + r.latency_s for r in records), default=end))
    for span in spans.values():
        if span.stopped is None or span.stopped > final:
            span.stopped = final
    return SimResult(records, list(spans.values()), final)
