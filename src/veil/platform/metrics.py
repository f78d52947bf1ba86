"""Per-function accounting: cold starts, warm hits, queue and execution times, instance count
over time and GB-seconds billed (memory x instance lifetime, as serverless platforms bill).

The warm pool is billed apart: a spare instance (and the fork template) holds memory for the
function without serving, from its spawn until a cold start takes it (then it is billed as a
serving instance) or it stops. `prewarm_gb_seconds` is that idle cost so far and
`prewarm_gb_s_per_hour` what the pool costs per hour at its current size, so the packer and the
reports can weigh it against the cold starts it saves.

Thread-safe on its own lock, so the pool can record without holding its scheduling lock longer.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Any

#: Samples kept per series; summaries are over the most recent ones. Counters are exact.
MAX_SAMPLES = 100_000


def summarize(samples: list[float] | deque[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max (nearest-rank percentiles), in the samples' unit."""
    values = sorted(samples)
    n = len(values)
    if n == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}

    def pct(p: float) -> float:
        return round(values[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))], 3)

    return {
        "count": n,
        "mean": round(sum(values) / n, 3),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(values[-1], 3),
    }


#: What a platform's `metrics()["totals"]` sums over its functions (the same on every platform).
TOTALLED = ("gb_seconds", "prewarm_gb_seconds", "cold_starts", "requests", "instances")


def totals(per_function: dict[str, dict[str, Any]]) -> dict[str, float | int]:
    """The platform-wide totals of per-function metrics, so `veil bench` and the console read
    one shape whichever platform produced them."""
    out: dict[str, float | int] = {}
    for key in TOTALLED:
        total = sum(m[key] for m in per_function.values())
        out[key] = round(total, 6) if isinstance(total, float) else total
    return out


class FunctionMetrics:
    """Counters and series of one function. Times are monotonic seconds; `t` in the timeline is
    seconds since `origin` (the platform's start), so timelines of functions line up."""

    def __init__(self, name: str, origin: float) -> None:
        self.name = name
        self.origin = origin
        self._lock = threading.Lock()
        self.cold_starts = 0
        self.start_failures = 0
        self.warm_hits = 0
        self.cold_hits = 0  # requests that waited for a cold start
        self.requests = 0
        self.crashes = 0
        self.retries = 0
        self.outcomes: Counter[str] = Counter()
        self.cold_start_ms: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.queue_ms: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.exec_ms: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.timeline: list[tuple[float, int]] = [(0.0, 0)]
        self.peak_instances = 0
        self._live: dict[str, tuple[int, float]] = {}  # id -> (memory_mb, start)
        self._pool: dict[str, tuple[int, float]] = {}  # warm pool: spares and the template
        self._closed_gb_s = 0.0
        self._closed_pool_gb_s = 0.0
        self._instance_seconds = 0.0
        self.out_of_memory = 0
        self.unresponsive = 0
        self.prewarm_hits = 0  # cold starts served by a spare of the warm pool
        self.spare_starts = 0
        self.spare_start_ms: deque[float] = deque(maxlen=MAX_SAMPLES)

    # -- instances -------------------------------------------------------------------------

    def instance_started(self, instance_id: str, memory_mb: int, at: float, *, pool: bool = False) -> None:
        """Billing starts when the process is spawned (its memory is reserved from then on);
        `pool`: a spare or the template, billed as the warm pool's idle cost."""
        with self._lock:
            if pool:
                self._pool[instance_id] = (memory_mb, at)
                return
            self._live[instance_id] = (memory_mb, at)
            self._mark(at)

    def spare_ready(self, start_s: float) -> None:
        with self._lock:
            self.spare_starts += 1
            self.spare_start_ms.append(start_s * 1000)

    def promoted(self, instance_id: str, at: float) -> None:
        """A cold start took a spare: its pool billing ends and its serving billing starts."""
        with self._lock:
            entry = self._pool.pop(instance_id, None)
            if entry is None:
                return
            memory_mb, start = entry
            self._closed_pool_gb_s += memory_mb / 1024 * max(0.0, at - start)
            self._live[instance_id] = (memory_mb, at)
            self.prewarm_hits += 1
            self.cold_starts += 1
            self.cold_start_ms.append(0.0)  # the request waited for no start
            self._mark(at)

    def instance_ready(self, cold_start_s: float) -> None:
        with self._lock:
            self.cold_starts += 1
            self.cold_start_ms.append(cold_start_s * 1000)

    def start_failed(self) -> None:
        with self._lock:
            self.start_failures += 1

    def instance_ended(self, instance_id: str, at: float, *, crashed: bool = False, reason: str = "") -> None:
        """Billing stops when the process is gone. Idempotent per instance. `reason`
        "out_of_memory" or "unresponsive" counts why the platform stopped it."""
        with self._lock:
            pooled = self._pool.pop(instance_id, None)
            if pooled is not None:
                self._closed_pool_gb_s += pooled[0] / 1024 * max(0.0, at - pooled[1])
            entry = self._live.pop(instance_id, None)
            if entry is None and pooled is None:
                return
            if crashed:
                self.crashes += 1
            if reason == "out_of_memory":
                self.out_of_memory += 1
            elif reason == "unresponsive":
                self.unresponsive += 1
            if entry is None:
                return
            memory_mb, start = entry
            lifetime = max(0.0, at - start)
            self._closed_gb_s += memory_mb / 1024 * lifetime
            self._instance_seconds += lifetime
            self._mark(at)

    def _mark(self, at: float) -> None:
        n = len(self._live)
        self.peak_instances = max(self.peak_instances, n)
        t = round(at - self.origin, 4)
        if self.timeline and self.timeline[-1][0] == t:
            self.timeline[-1] = (t, n)
        else:
            self.timeline.append((t, n))

    def gb_seconds(self, now: float | None = None) -> float:
        """Σ memory_mb/1024 × lifetime over every instance; live ones count up to `now`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            live = sum(m / 1024 * max(0.0, now - s) for m, s in self._live.values())
            return self._closed_gb_s + live

    # -- requests --------------------------------------------------------------------------

    def request_done(self, *, cold: bool, queue_s: float, exec_s: float | None, outcome: str) -> None:
        """One finished invoke: `outcome` is "ok" or the PlatformError code."""
        with self._lock:
            self.requests += 1
            self.outcomes[outcome] += 1
            if exec_s is not None:
                if cold:
                    self.cold_hits += 1
                else:
                    self.warm_hits += 1
                self.exec_ms.append(exec_s * 1000)
            self.queue_ms.append(queue_s * 1000)

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    # -- report ----------------------------------------------------------------------------

    def snapshot(self, *, raw: bool = False, now: float | None = None) -> dict[str, Any]:
        """JSON-safe report. `raw=True` adds the sample lists (ms) for benchmarks."""
        now = time.monotonic() if now is None else now
        with self._lock:
            live = sum(m / 1024 * max(0.0, now - s) for m, s in self._live.values())
            live_s = sum(max(0.0, now - s) for _, s in self._live.values())
            pool_live = sum(m / 1024 * max(0.0, now - s) for m, s in self._pool.values())
            out: dict[str, Any] = {
                "function": self.name,
                "requests": self.requests,
                "outcomes": dict(self.outcomes),
                "cold_starts": self.cold_starts,
                "start_failures": self.start_failures,
                "warm_hits": self.warm_hits,
                "cold_hits": self.cold_hits,
                "crashes": self.crashes,
                "retries": self.retries,
                "cold_start_ms": summarize(self.cold_start_ms),
                "queue_ms": summarize(self.queue_ms),
                "exec_ms": summarize(self.exec_ms),
                "instances": len(self._live),
                "peak_instances": self.peak_instances,
                "instance_timeline": [[t, n] for t, n in self.timeline],
                "instance_seconds": round(self._instance_seconds + live_s, 4),
                "gb_seconds": round(self._closed_gb_s + live, 6),
                "out_of_memory": self.out_of_memory,
                "unresponsive_killed": self.unresponsive,
                "prewarm_hits": self.prewarm_hits,
                "spare_starts": self.spare_starts,
                "spare_start_ms": summarize(self.spare_start_ms),
                "prewarm_gb_seconds": round(self._closed_pool_gb_s + pool_live, 6),
                "prewarm_gb_s_per_hour": round(sum(m / 1024 for m, _ in self._pool.values()) * 3600, 3),
            }
            if raw:
                out["samples"] = {
                    "cold_start_ms": [round(v, 3) for v in self.cold_start_ms],
                    "queue_ms": [round(v, 3) for v in self.queue_ms],
                    "exec_ms": [round(v, 3) for v in self.exec_ms],
                }
            return out
