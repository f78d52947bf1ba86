"""What a packing run costs and how fast it answered; one definition for the Packer and the
simulator, so their figures are comparable.

- `gb_s`: sum over instances of memory_mb / 1024 x (stopped - created), created when the start
  was requested (a starting instance is billed) and stopped when the stop was issued or the run
  ended. This is what the provider holds, keep-alive included.
- `cold_start_fraction`: share of requests that waited on an instance start or a model load.
- `p50_ms`, `p99_ms`: latency percentiles of successful requests.
- `max_instances`: the most instances alive at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One request as an executor saw it (times on the executor's clock, seconds)."""

    at: float
    model: str
    latency_s: float
    cold: bool
    ok: bool
    instance: str = ""
    error: str = ""


@dataclass
class InstanceSpan:
    """An instance's life, for billing and the instances-over-time plot."""

    instance: str
    function: str
    memory_mb: float
    created: float
    stopped: float | None = None


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: a p99 is a latency someone actually saw)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def timeline(spans: list[InstanceSpan], end: float) -> list[tuple[float, int]]:
    """(time, instances alive) at every change."""
    events: list[tuple[float, int]] = []
    for span in spans:
        events.append((span.created, 1))
        events.append((span.stopped if span.stopped is not None else end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    alive = 0
    out: list[tuple[float, int]] = []
    for t, delta in events:
        alive += delta
        out.append((t, alive))
    return out


def summarize(
    requests: list[RequestRecord],
    spans: list[InstanceSpan],
    end: float,
    origin: float = 0.0,
    warmup_s: float = 10.0,
) -> dict:
    """The report's per-policy figures (JSON-safe). `p99_after_warmup_ms` leaves out requests
    that arrived in the first `warmup_s` (when every policy starts from zero instances), to
    tell the steady-state tail from the start-up burst; the headline `p99_ms` keeps them."""
    gb_s = sum(s.memory_mb / 1024.0 * ((s.stopped if s.stopped is not None else end) - s.created) for s in spans)
    ok = [r for r in requests if r.ok]
    lat_ms = [r.latency_s * 1000.0 for r in ok]
    steady = [r.latency_s * 1000.0 for r in ok if r.at - origin >= warmup_s]
    peak = max((n for _, n in timeline(spans, end)), default=0)
    return {
        "gb_s": round(gb_s, 3),
        "cold_start_fraction": round(sum(r.cold for r in requests) / len(requests), 4) if requests else 0.0,
        "p50_ms": round(percentile(lat_ms, 50), 2),
        "p99_ms": round(percentile(lat_ms, 99), 2),
        "p99_after_warmup_ms": round(percentile(steady, 99), 2),
        "mean_ms": round(sum(lat_ms) / len(lat_ms), 2) if lat_ms else math.nan,
        "max_instances": peak,
        "instances_started": len(spans),
        "requests": len(requests),
        "failed": len(requests) - len(ok),
        "duration_s": round(end - origin, 3),
    }
