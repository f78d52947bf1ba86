"""The models one replica holds and how long each is expected back (pure logic, no Ray).

With Veil's router the keep-alive of each model is learned in the router (the packer's
`KeepAliveLearner` over the model's inter-arrival times) and sent along with each request; the
replica keeps the model until that window after its last use ends, then drops it (an unload
request to the runtime when it has one). A replica holding no model inside its window and
serving nothing is not *live*: it reports so to Serve's autoscaler, which then needs it only
for load. This is the packer's per-model keep-alive, applied where Ray decides replica counts.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class _Model:
    last_used: float
    keepalive_s: float
    inflight: int = 0


class ReplicaModels:
    """Resident models of one replica, least recently used first. Thread-safe."""

    def __init__(self, default_keepalive_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_keepalive_s = default_keepalive_s
        self._clock = clock
        self._lock = threading.Lock()
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._inflight = 0

    def begin(self, model: str | None, keepalive_s: float | None = None) -> bool:
        """A request for `model` starts; returns True if the model was not resident (a load)."""
        now = self._clock()
        with self._lock:
            self._inflight += 1
            if not model:
                return False
            entry = self._models.get(model)
            load = entry is None
            if entry is None:
                entry = self._models[model] = _Model(now, self.default_keepalive_s)
            if keepalive_s is not None:
                entry.keepalive_s = float(keepalive_s)
            entry.inflight += 1
            entry.last_used = now
            self._models.move_to_end(model)
            return load

    def end(self, model: str | None) -> None:
        now = self._clock()
        with self._lock:
            self._inflight = max(0, self._inflight - 1)
            entry = self._models.get(model) if model else None
            if entry is not None:
                entry.inflight = max(0, entry.inflight - 1)
                entry.last_used = now

    def evict(self, models: Iterable[str]) -> list[str]:
        """Drop these models (the router's memory decision); returns those that were resident
        and idle (a model with requests in flight is kept: the router never evicts one)."""
        out: list[str] = []
        with self._lock:
            for model in models:
                entry = self._models.get(model)
                if entry is not None and entry.inflight == 0:
                    del self._models[model]
                    out.append(model)
        return out

    def expire(self) -> list[str]:
        """Drop and return the idle models whose keep-alive window has ended."""
        now = self._clock()
        with self._lock:
            gone = [m for m, e in self._models.items() if e.inflight == 0 and now >= e.last_used + e.keepalive_s]
            for model in gone:
                del self._models[model]
        return gone

    def live(self) -> bool:
        """Serving something, or holding a model inside its keep-alive window."""
        now = self._clock()
        with self._lock:
            if self._inflight:
                return True
            return any(now < e.last_used + e.keepalive_s for e in self._models.values())

    def idle(self) -> bool:
        """No model resident and no request in flight."""
        with self._lock:
            return not self._models and not self._inflight

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def snapshot(self) -> dict[str, dict[str, float]]:
        now = self._clock()
        with self._lock:
            return {
                m: {"idle_s": round(now - e.last_used, 3), "keepalive_s": e.keepalive_s, "inflight": e.inflight}
                for m, e in self._models.items()
            }
