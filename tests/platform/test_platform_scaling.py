"""Scale-out, the max_instances bound, queueing, busy, timeouts, scale to zero, min_instances."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from veil.platform import PlatformError


def _max_over_timeline(m: dict) -> int:
    return max(n for _, n in m["instance_timeline"])


def test_requests_within_concurrency_share_one_cold_start(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=4, max_instances=4))
    with ThreadPoolExecutor(4) as ex:
        pids = list(ex.map(lambda _: platform.invoke("echo", {"sleep": 0.3}, timeout=10)["pid"], range(4)))
    assert len(set(pids)) == 1  # all four waited on the one starting instance's slots
    m = platform.metrics("echo")
    assert m["cold_starts"] == 1 and m["cold_hits"] + m["warm_hits"] == 4


def test_scale_out_beyond_concurrency_never_above_max_instances(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=1, max_instances=3, max_queue=32))
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            infos = platform.instances("echo")
            peak = max(peak, len(infos))
            assert all(i.inflight <= 1 for i in infos)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(9) as ex:
            results = list(ex.map(lambda _: platform.invoke("echo", {"sleep": 0.2}, timeout=20), range(9)))
    finally:
        stop.set()
        watcher.join()
    pids = {r["pid"] for r in results}
    assert len(pids) == 3  # scaled out to the limit, not beyond
    assert peak <= 3
    m = platform.metrics("echo")
    assert m["cold_starts"] == 3 and m["peak_instances"] == 3 and _max_over_timeline(m) == 3
    assert m["requests"] == 9 and m["outcomes"] == {"ok": 9}
    assert m["queue_ms"]["max"] >= 150  # some had to queue behind a 200 ms request


def test_most_recently_used_instance_is_preferred(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=1, max_instances=2))
    a = platform.start_instance("echo")
    time.sleep(0.01)
    b = platform.start_instance("echo")
    pid = {i.id: i.pid for i in platform.instances("echo")}
    platform.invoke_instance("echo", a, {}, timeout=5)  # a is now the most recently used
    for _ in range(3):
        assert platform.invoke("echo", {}, timeout=5)["pid"] == pid[a]
    assert {i.id: i.requests for i in platform.instances("echo")} == {a: 4, b: 0}


def test_queue_then_busy(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(concurrency=1, max_instances=1, max_queue=1))
    platform.start_instance("echo")
    results: dict[str, object] = {}

    def call(key: str, value: dict) -> None:
        try:
            results[key] = platform.invoke("echo", value, timeout=10)
        except PlatformError as e:
            results[key] = e

    running = threading.Thread(target=call, args=("running", {"sleep": 0.6}))
    running.start()
    assert wait_until(lambda: platform.metrics("echo")["inflight"] == 1)
    queued = threading.Thread(target=call, args=("queued", {"n": 2}))
    queued.start()
    assert wait_until(lambda: platform.metrics("echo")["queued"] == 1)

    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {"n": 3}, timeout=10)
    assert time.monotonic() - t < 0.3  # refused at once, not after waiting
    e = ei.value
    assert e.code == "busy" and e.status == 503
    assert "'echo'" in e.message and "max_queue=1" in e.message

    running.join(5)
    queued.join(5)
    assert results["queued"]["echo"] == {"n": 2}  # type: ignore[index]
    m = platform.metrics("echo")
    assert m["outcomes"] == {"ok": 2, "busy": 1}
    assert m["queue_ms"]["max"] >= 300  # the queued one waited for the 600 ms request
    assert m["instances"] == 1 and m["cold_starts"] == 1


def test_invoke_timeouts_never_hang(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=1, max_instances=1))
    platform.start_instance("echo")
    # execution longer than the invoke timeout
    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {"sleep": 3}, timeout=0.4)
    assert time.monotonic() - t < 1.0
    assert ei.value.code == "timeout" and ei.value.status == 504
    assert "no result within 0.40 s" in ei.value.message
    # waiting in the queue longer than the invoke timeout
    blocker = threading.Thread(target=lambda: platform.invoke("echo", {"sleep": 1.0}, timeout=5))
    time.sleep(0.05)
    blocker.start()
    time.sleep(0.1)
    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {}, timeout=0.3)
    assert time.monotonic() - t < 0.8
    assert ei.value.code == "timeout" and "queue" in ei.value.message
    blocker.join(5)
    assert platform.metrics("echo")["queued"] == 0


def test_idle_timeout_scales_to_zero_and_billing_stops(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(idle_timeout_s=0.3, memory_mb=1024))
    pid = platform.invoke("echo", {}, timeout=5)["pid"]
    assert len(platform.instances("echo")) == 1
    assert wait_until(lambda: platform.instances("echo") == [], timeout=5)
    # billing stops once the process is gone, a moment after it leaves the routing table
    assert wait_until(lambda: platform.metrics("echo")["instances"] == 0, timeout=5)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    m1 = platform.metrics("echo")
    assert m1["instances"] == 0 and m1["instance_timeline"][-1][1] == 0
    time.sleep(0.3)
    m2 = platform.metrics("echo")
    assert m2["gb_seconds"] == m1["gb_seconds"] > 0  # nothing accrues at zero instances
    # lifetime ≈ cold start + idle timeout (+ reaper tick); 1024 MB => GB-s == seconds
    assert 0.3 <= m2["gb_seconds"] <= 1.5
    # the next request cold-starts again
    assert platform.invoke("echo", {}, timeout=5)["pid"] != pid
    assert platform.metrics("echo")["cold_starts"] == 2


def test_min_instances_stay_warm(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(min_instances=1, idle_timeout_s=0.1))
    assert wait_until(lambda: [i.state for i in platform.instances("echo")] == ["ready"])
    pid = platform.instances("echo")[0].pid
    time.sleep(0.5)  # well past the idle timeout
    assert [i.pid for i in platform.instances("echo")] == [pid]
    r = platform.invoke("echo", {}, timeout=5)
    assert r["pid"] == pid
    m = platform.metrics("echo")
    assert m["warm_hits"] == 1 and m["cold_starts"] == 1


def test_concurrent_cold_starts_respect_max_instances(platform, echo_spec):
    # Slow starts: every request arrives while instances are still starting.
    platform.deploy(echo_spec(concurrency=1, max_instances=2, init_value={"init_sleep": 0.5}))
    with ThreadPoolExecutor(6) as ex:
        pids = list(ex.map(lambda _: platform.invoke("echo", {}, timeout=20)["pid"], range(6)))
    assert len(set(pids)) == 2
    m = platform.metrics("echo")
    assert m["cold_starts"] == 2 and m["peak_instances"] == 2


def test_queue_is_first_come_first_served(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(concurrency=1, max_instances=1, max_queue=16))
    platform.start_instance("echo")
    order: list[int] = []
    lock = threading.Lock()

    def call(i: int, sleep: float) -> None:
        platform.invoke("echo", {"i": i, "sleep": sleep}, timeout=20)
        with lock:
            order.append(i)

    threads = [threading.Thread(target=call, args=(0, 0.3))]
    threads[0].start()
    assert wait_until(lambda: platform.metrics("echo")["inflight"] == 1)
    for i in range(1, 7):
        t = threading.Thread(target=call, args=(i, 0.02))
        t.start()
        threads.append(t)
        assert wait_until(lambda i=i: platform.metrics("echo")["queued"] == i)
    for t in threads:
        t.join(20)
    assert order == list(range(7))
