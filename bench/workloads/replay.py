"""Real-time replay of a trace against an invoke function (the gateway's packer entry point).

A dispatcher sleeps until each request's arrival time and hands it to a bounded pool of worker
threads; at most `max_inflight` requests are in flight (the rest wait, and that wait counts in
their latency, measured from the scheduled arrival so a slow system cannot hide its backlog).
It stops by itself after the last request (or `max_requests`) has completed or timed out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Sent:
    """One replayed request: scheduled arrival (s from start), how late it was sent, latency
    from the scheduled arrival, and the outcome."""

    at: float
    model: str
    lag_s: float
    latency_s: float
    ok: bool
    error: str = ""


def replay(
    times: list[float],
    models: list[str],
    invoke: Callable[[str], object],
    *,
    max_inflight: int = 64,
    max_requests: int | None = None,
    speed: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[Sent]:
    """Drive `invoke(model)` at the trace's times (divided by `speed`); returns one Sent each."""
    if speed <= 0 or max_inflight < 1:
        raise ValueError("speed must be > 0 and max_inflight >= 1")
    count = len(times) if max_requests is None else min(len(times), max_requests)
    slots = threading.BoundedSemaphore(max_inflight)
    results: list[Sent | None] = [None] * count
    origin = clock()

    def run(idx: int, scheduled: float, sent: float) -> None:
        ok, error = True, ""
        try:
            invoke(models[idx])
        except Exception as exc:  # every failure is a result, never a crash of the replayer
            ok, error = False, getattr(exc, "code", type(exc).__name__)
        finally:
            done = clock() - origin
            results[idx] = Sent(scheduled, models[idx], sent - scheduled, done - scheduled, ok, str(error))
            slots.release()

    with ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="replay") as pool:
        for idx in range(count):
            scheduled = times[idx] / speed
            delay = scheduled - (clock() - origin)
            if delay > 0:
                time.sleep(delay)
            slots.acquire()
            pool.submit(run, idx, scheduled, clock() - origin)
    return [r for r in results if r is not None]
