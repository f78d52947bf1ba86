"""The abstract cluster a packing policy reasons about, and the decisions it returns.

Policies are pure decision logic: they never touch a process, a socket or a clock. Time comes in
as an argument (`now`, seconds on any monotonic scale), so the very same policy object can drive
the discrete-event simulator (simulated seconds) and the real `Packer` (time.monotonic()). That
shared code is what makes a sim-vs-real comparison meaningful.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Instance:
    """One runtime instance as the policy sees it.

    `inflight` counts requests admitted to the instance (running or queued for one of its
    `capacity` slots) per model. `resident` holds the models loaded or being loaded, oldest use
    first (LRU order); `loading` those whose first request has not completed yet.
    """

    id: str
    function: str
    capacity: int
    memory_mb: float
    created_at: float
    seq: int
    ready: bool = False
    inflight: dict[str, int] = field(default_factory=dict)
    resident: OrderedDict[str, float] = field(default_factory=OrderedDict)
    loading: set[str] = field(default_factory=set)
    last_used: float = 0.0

    @property
    def total_inflight(self) -> int:
        return sum(self.inflight.values())

    def model_inflight(self, model: str) -> int:
        return self.inflight.get(model, 0)

    def admit(self, model: str, now: float) -> None:
        self.inflight[model] = self.inflight.get(model, 0) + 1
        self.last_used = now
        if model in self.resident:
            self.resident.move_to_end(model)
        self.resident[model] = now

    def release(self, model: str, now: float) -> None:
        count = self.inflight.get(model, 0) - 1
        if count <= 0:
            self.inflight.pop(model, None)
        else:
            self.inflight[model] = count
        self.last_used = now
        if model in self.resident:
            self.resident[model] = now
            self.resident.move_to_end(model)


@dataclass(frozen=True)
class Route:
    """Send this request for `model` to `instance`.

    `start`: the decision created the instance; the executor must start it (cold start).
    `load`: the model is not resident there; the instance will load it (cold model load).
    `evict`: models the decision dropped from the instance to make memory room.
    `cold`: the request will wait on an instance start or a model load (its own or another's).
    `at`: when the decision was made; handed back to `Policy.complete`.
    """

    model: str
    instance: str
    function: str
    at: float
    start: bool = False
    load: bool = False
    cold: bool = False
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reject:
    """No instance can take the request (e.g. SeSeMI's "all busy")."""

    model: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop this instance now (its keep-alive ran out)."""

    instance: str
    function: str


@dataclass(frozen=True)
class Unload:
    """Drop `model` from `instance` (its per-model keep-alive ran out); frees memory."""

    instance: str
    function: str
    model: str


Decision = Route | Reject
Action = Stop | Unload


@dataclass(frozen=True)
class PoolSpec:
    """What every policy needs to know about the instances it may create.

    `memory_mb` is an instance's size (what it is billed for); `base_mb` what the runtime uses
    before any model is loaded; `model_mb` each model's resident size (a default for unknown
    models). `idle_timeout_s` is the platform's fixed keep-alive used by the baselines.
    `can_unload`: the executor can make an instance drop a model (an unload request); without
    it a model stays until its instance stops, so making room by eviction is not an option.
    """

    function: str
    capacity: int = 4
    memory_mb: float = 512.0
    base_mb: float = 80.0
    max_instances: int = 32
    idle_timeout_s: float = 60.0
    model_mb: dict[str, float] = field(default_factory=dict)
    default_model_mb: float = 40.0
    can_unload: bool = True

    def size_of(self, model: str) -> float:
        return self.model_mb.get(model, self.default_model_mb)
