"""The runtime's two caches, both single-flight: concurrent misses for one entry do the work
once, and a failed load leaves no entry behind (the next request tries again cleanly).

- `KeyCache`: (model, user) → released keys, for a TTL (default 60 s): the revocation delay.
- `ModelCache`: model → loaded model, LRU bounded by bytes, many models at once (SeSeMI kept a
  single slot). Entries with requests in flight are never evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
    """Time-bounded cache of released keys."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[Hashable, tuple[V, float]] = {}
        self._lock = threading.Lock()
        self._flight = _SingleFlight()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], V]) -> tuple[V, bool]:
        """(value, hit?) — calls `load` on a miss or expiry; exceptions propagate, nothing cached."""
        value = self._fresh(key)
        if value is not None:
            return value, True
        with self._flight.lock(key):
            value = self._fresh(key)
            if value is not None:
                return value, True
            value = load()
            with self._lock:
                self._entries[key] = (value, self._clock() + self.ttl_s)
                self.misses += 1
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
        return len(self._entries)


@dataclass
class _Slot:
    value: Any
    nbytes: int
    in_flight: int = 0


class ModelCache:
    """LRU by bytes. `use(key, load)` is a context manager that pins the entry while in use."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
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
                self._evict_locked()
            return value, False

    def release(self, key: Hashable) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.in_flight -= 1
            self._evict_locked()

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
