"""Usage and latency the console measured itself, per model, for the requests it sent.

These are the only per-model figures a user can trust without trusting the cloud: the gateway's
and platform's numbers are the operator's own, whereas a round trip timed here is what this
principal actually waited. Kept in memory for the console's run.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_SAMPLES = 1000


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (the platform's metrics use the same rule)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class _ModelUsage:
    ok: int = 0
    errors: int = 0
    last_error: str = ""
    last_at: float = 0.0
    round_trip_ms: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    runtime_ms: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


class UsageRecorder:
    """Thread-safe per-model counters and latency samples."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _ModelUsage] = {}

    def record(
        self, model: str, *, ok: bool, round_trip_ms: float | None, runtime_ms: float | None = None, error: str = ""
    ) -> None:
        with self._lock:
            usage = self._models.setdefault(model, _ModelUsage())
            usage.last_at = time.time()
            if ok:
                usage.ok += 1
            else:
                usage.errors += 1
                usage.last_error = error
            if round_trip_ms is not None:
                usage.round_trip_ms.append(round_trip_ms)
            if runtime_ms is not None:
                usage.runtime_ms.append(runtime_ms)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model: requests, ok, errors, last error, and round-trip / in-runtime p50, p90, max (ms)."""
        with self._lock:
            snapshot = {
                m: (u.ok, u.errors, u.last_error, u.last_at, list(u.round_trip_ms), list(u.runtime_ms))
                for m, u in self._models.items()
            }
        out = {}
        for model, (ok, errors, last_error, last_at, rtt, runtime) in sorted(snapshot.items()):
            out[model] = {
                "requests": ok + errors,
                "ok": ok,
                "errors": errors,
                "last_error": last_error,
                "last_at": last_at,
                "round_trip_ms": _stats(rtt),
                "runtime_ms": _stats(runtime),
            }
        return out


def _stats(values: list[float]) -> dict[str, float | int | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    return {
        "count": len(values),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "max": r(max(values) if values else None),
    }
