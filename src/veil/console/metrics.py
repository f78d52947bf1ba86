"""The gateway's public figures: Prometheus `/metrics` and the platform's `/v1/platform/metrics`.

These are the operator's own numbers (request counts and latency by mode, instances, cold starts,
GB-seconds billed), public and unauthenticated: the console shows them as the cloud reports them,
never mixed with what it measured itself (`veil.console.usage`). Billing is GB-seconds times a
price per GB-second the principal chooses (`--price-per-gb-s`), since the platform states no price.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

FETCH_TIMEOUT_S = 5.0
# platform fields worth a row on the page (the rest, e.g. the instance timeline, stay out)
FUNCTION_FIELDS = (
    "instances",
    "peak_instances",
    "ready",
    "inflight",
    "queued",
    "cold_starts",
    "warm_hits",
    "requests",
    "crashes",
    "memory_mb",
    "gb_seconds",
    "instance_seconds",
    "cold_start_ms",
    "exec_ms",
    "queue_ms",
    "outcomes",
    "removed",
)


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the first histogram bucket holding the q-quantile (what a histogram can say)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    for bound, cumulative in buckets:
        if cumulative >= target:
            return bound
    return math.inf


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Per mode: ok and error counts (`veil_requests_total`), and gateway latency from
    `veil_request_seconds` (count, mean, and p50/p90 as bucket upper bounds, in ms)."""
    modes: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            mode = sample.labels.get("mode")
            if mode is None:
                continue
            row = modes.setdefault(mode, {"ok": 0, "error": 0, "count": 0, "sum_s": 0.0})
            if sample.name == "veil_requests_total":
                row[sample.labels.get("outcome", "ok")] = int(sample.value)
            elif sample.name == "veil_request_seconds_count":
                row["count"] = int(sample.value)
            elif sample.name == "veil_request_seconds_sum":
                row["sum_s"] = sample.value
            elif sample.name == "veil_request_seconds_bucket":
                buckets.setdefault(mode, []).append((float(sample.labels["le"]), sample.value))
    for mode, row in modes.items():
        ordered = sorted(buckets.get(mode, []))
        row["mean_ms"] = round(row["sum_s"] / row["count"] * 1e3, 2) if row["count"] else None
        for name, q in (("p50_le_ms", 0.5), ("p90_le_ms", 0.9)):
            bound = _bucket_quantile(ordered, q)
            row[name] = None if bound is None else (bound * 1e3 if math.isfinite(bound) else "inf")
        del row["sum_s"]
    return modes


def platform_view(raw: dict[str, Any], price_per_gb_s: float) -> dict[str, Any]:
    """The platform's functions (the page's rows), totals and the bill at the chosen price."""
    functions = {
        name: {k: m[k] for k in FUNCTION_FIELDS if k in m}
        for name, m in sorted((raw.get("functions") or {}).items())
        if isinstance(m, dict)
    }
    totals = dict(raw.get("totals") or {})
    gb_s = float(totals.get("gb_seconds") or 0.0)
    return {
        "uptime_s": raw.get("uptime_s"),
        "functions": functions,
        "totals": totals,
        "billing": {
            "gb_seconds": round(gb_s, 3),
            "price_per_gb_s": price_per_gb_s,
            "cost": round(gb_s * price_per_gb_s, 6) if price_per_gb_s else None,
        },
    }


def gateway_figures(gateway_url: str, price_per_gb_s: float, client: httpx.Client | None = None) -> dict[str, Any]:
    """Both public endpoints; each part carries its own error, so one failing hides nothing else."""
    own = client is None
    client = client or httpx.Client(base_url=gateway_url, timeout=FETCH_TIMEOUT_S)
    out: dict[str, Any] = {}
    try:
        try:
            response = client.get("/metrics")
            response.raise_for_status()
            out["prometheus"] = parse_prometheus(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            out["prometheus_error"] = f"{gateway_url}/metrics: {type(exc).__name__}: {exc}"[:300]
        try:
            response = client.get("/v1/platform/metrics")
            response.raise_for_status()
            out["platform"] = platform_view(response.json(), price_per_gb_s)
        except (httpx.HTTPError, ValueError) as exc:
            out["platform_error"] = f"{gateway_url}/v1/platform/metrics: {type(exc).__name__}: {exc}"[:300]
    finally:
        if own:
            client.close()
    return out
