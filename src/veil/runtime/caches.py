"""The runtime's caches. The first two are single-flight: concurrent misses for one entry do the
work once, and a failed load leaves no entry behind (the next request tries again cleanly).

- `KeyCache`: (model, user) → released keys, each entry for the TTL its release named (the
  revocation delay), never longer than the cache's measured maximum; TTL 0 is not cached.
- `ModelCache`: (model, version) → loaded model, LRU bounded by bytes, many models at once
  (SeSeMI kept a single slot). Entries with requests in flight are never evicted; loading a new
  version of a model retires the others (dropped as soon as no request uses them).
- `ReplayCache`: request ids accepted within their envelope's window, bounded, thread-safe.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from veil.errors import Busy

V = TypeVar("V")


class _SingleFlight:
    """Per-key locks so that only one thread loads a given key at a time."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}

    def lock(self, key: Hashable) -> _KeyLock:
        return _KeyLock(self, key)


class _KeyLock:
    def __init__(self, owner: _SingleFlight, key: Hashable) -> None:
        self._owner, self._key = owner, key

    def __enter__(self) -> None:
        with self._owner._guard:
            lock, users = self._owner._locks.get(self._key, (threading.Lock(), 0))
            self._owner._locks[self._key] = (lock, users + 1)
        lock.acquire()

    def __exit__(self, *exc: object) -> None:
        with self._owner._guard:
            lock, users = self._owner._locks[self._key]
            lock.release()
            if users == 1:
                del self._owner._locks[self._key]
            else:
                self._owner._locks[self._key] = (lock, users - 1)


class KeyCache(Generic[V]):
    """Time-bounded cache of released keys; every entry has its own lifetime."""

    def __init__(self, max_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._entries: dict[Hashable, tuple[V, float]] = {}
        self._lock = threading.Lock()
        self._flight = _SingleFlight()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], tuple[V, float]]) -> tuple[V, bool]:
        """(value, hit?). On a miss or expiry `load()` gives (value, ttl in seconds); the value is
        kept for min(ttl, max_ttl_s), not at all when that is 0 (or not a number). Exceptions
        propagate and nothing is cached."""
        value = self._fresh(key)
        if value is not None:
            return value, True
        with self._flight.lock(key):
            value = self._fresh(key)
            if value is not None:
                return value, True
            value, ttl_s = load()
            ttl = min(float(ttl_s), float(self.max_ttl_s))
            with self._lock:
                self.misses += 1
                if ttl > 0 and math.isfinite(ttl):
                    self._entries[key] = (value, self._clock() + ttl)
                else:
                    self._entries.pop(key, None)
            return value, False

    def _fresh(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= self._clock():
                del self._entries[key]
                return None
            self.hits += 1
            return entry[0]

    def invalidate(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        now = self._clock()
        with self._lock:
            for key in [k for k, (_, until) in self._entries.items() if until <= now]:
                del self._entries[key]
            return len(self._entries)


@dataclass
class _Slot:
    value: Any
    nbytes: int
    in_flight: int = 0
    retired: bool = False  # superseded: dropped when its last request releases it


class ModelCache:
    """LRU by bytes. `acquire(key, load)` pins the entry until `release(key)`.

    `family(key)` (e.g. the model id of a (model, version) key) groups entries that supersede each
    other: loading one retires the rest of its family, so an old version leaves memory as soon as
    no request in flight uses it, instead of waiting for LRU pressure.
    """

    def __init__(self, capacity_bytes: int, family: Callable[[Hashable], Hashable] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self._family = family
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._flight = _SingleFlight()
        self.loads = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._slots.values())

    def cached_models(self) -> list[Hashable]:
        with self._lock:
            return list(self._slots)

    def acquire(self, key: Hashable, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """Pin and return (value, was_cached). `load` returns (value, size in bytes)."""
        slot = self._pin(key)
        if slot is not None:
            return slot.value, True
        with self._flight.lock(key):
            slot = self._pin(key)
            if slot is not None:
                return slot.value, True
            value, nbytes = load()
            with self._lock:
                self._slots[key] = _Slot(value, nbytes, in_flight=1)
                self.loads += 1
                if self._family is not None:
                    self._retire_family_locked(key)
                self._evict_locked()
            return value, False

    def release(self, key: Hashable) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.in_flight -= 1
                if slot.retired and slot.in_flight <= 0:
                    del self._slots[key]
                    self.evictions += 1
            self._evict_locked()

    def _retire_family_locked(self, key: Hashable) -> None:
        assert self._family is not None
        family = self._family(key)
        for other in [k for k in self._slots if k != key and self._family(k) == family]:
            slot = self._slots[other]
            if slot.in_flight > 0:
                slot.retired = True
            else:
                del self._slots[other]
                self.evictions += 1

    def _pin(self, key: Hashable) -> _Slot | None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.in_flight += 1
                self._slots.move_to_end(key)
            return slot

    def _evict_locked(self) -> None:
        total = sum(s.nbytes for s in self._slots.values())
        for key in list(self._slots):
            if total <= self.capacity_bytes:
                return
            slot = self._slots[key]
            if slot.in_flight > 0:
                continue  # never drop a model that requests are using
            del self._slots[key]
            total -= slot.nbytes
            self.evictions += 1


class ReplayCache:
    """Keys (request ids) seen within their validity window: `add` each once per window.

    Every entry carries the instant its envelope's window ends and is dropped after it (nothing
    can be replayed then: the envelope is refused as expired). Bounded by `capacity` entries
    alive at once; past that, `add` refuses with `Busy` rather than forget one early.
    """

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        self._until: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.replays = 0

    def add(self, key: Hashable, until: float) -> bool:
        """Record `key` as used until `until` (the same clock); False if it was already recorded."""
        with self._lock:
            now = self._clock()
            self._prune_locked(now)
            if key in self._until:
                self.replays += 1
                return False
            if len(self._until) >= self.capacity:
                raise Busy("instance busy: too many requests within the replay window, try again later")
            self._until[key] = until
            self._seq += 1
            heapq.heappush(self._heap, (until, self._seq, key))
            return True

    def _prune_locked(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            until, _, key = heapq.heappop(self._heap)
            if self._until.get(key) == until:
                del self._until[key]

    def __len__(self) -> int:
        with self._lock:
            self._prune_locked(self._clock())
            return len(self._until)
