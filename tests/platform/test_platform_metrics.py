"""Metrics are consistent with what happened: counts, timeline, GB-seconds = memory × lifetime."""

from __future__ import annotations

import json
import time

from veil.platform.metrics import summarize


def test_gb_seconds_match_memory_times_lifetime(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(memory_mb=2048, idle_timeout_s=0.4))
    t_before = time.monotonic()
    platform.invoke("echo", {}, timeout=5)
    t_after_call = time.monotonic()
    assert wait_until(lambda: platform.instances("echo") == [], timeout=5)
    # billing stops once the process is gone, a moment after it leaves the routing table
    assert wait_until(lambda: platform.metrics("echo")["instances"] == 0, timeout=5)
    t_gone = time.monotonic()
    m = platform.metrics("echo")
    # lifetime lies between (last use + idle timeout) and the moment we saw it gone
    low = 2.0 * (t_after_call - t_before + 0.4) * 0.5  # spawn may start after t_before
    high = 2.0 * (t_gone - t_before)
    assert 2.0 * 0.4 <= m["gb_seconds"] <= high + 0.01
    assert m["gb_seconds"] >= low * 0.5
    assert abs(m["gb_seconds"] - 2.0 * m["instance_seconds"]) < 1e-3
    # timeline: 0 -> 1 -> 0, the durations of which sum to instance_seconds
    tl = m["instance_timeline"]
    assert [n for _, n in tl] == [0, 1, 0]
    assert abs((tl[2][0] - tl[1][0]) - m["instance_seconds"]) < 0.01


def test_live_instances_accrue_until_now(platform, echo_spec):
    platform.deploy(echo_spec(memory_mb=512, idle_timeout_s=60, max_instances=2, concurrency=1))
    platform.start_instance("echo")
    platform.start_instance("echo")
    g1 = platform.metrics("echo")["gb_seconds"]
    time.sleep(0.5)
    g2 = platform.metrics("echo")["gb_seconds"]
    # two live 0.5 GB instances for 0.5 s: 0.5 GB-s more, give or take scheduling noise
    assert 0.4 <= g2 - g1 <= 0.7


def test_counters_and_json_safety(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=2))
    for i in range(5):
        platform.invoke("echo", {"i": i}, timeout=5)
    m = platform.metrics("echo", raw=True)
    assert m["requests"] == 5 and m["cold_starts"] == 1
    assert m["cold_hits"] == 1 and m["warm_hits"] == 4
    assert m["exec_ms"]["count"] == 5 and m["queue_ms"]["count"] == 5
    assert len(m["samples"]["exec_ms"]) == 5 and len(m["samples"]["cold_start_ms"]) == 1
    assert m["cold_start_ms"]["p50"] > m["exec_ms"]["p50"]  # a cold start costs a process
    assert m["exec_ms"]["p50"] <= m["exec_ms"]["p99"] <= m["exec_ms"]["max"]
    everything = platform.metrics()
    assert everything["functions"]["echo"]["requests"] == 5
    assert everything["totals"]["cold_starts"] == 1
    assert json.loads(json.dumps(everything, allow_nan=False)) == json.loads(json.dumps(everything))


def test_summarize_percentiles():
    s = summarize(list(range(1, 101)))
    assert (s["count"], s["p50"], s["p90"], s["p99"], s["max"]) == (100, 50, 90, 99, 100)
    assert summarize([])["p50"] is None
    assert summarize([7.0])["p99"] == 7.0
