"""Crashes: a dead instance is replaced, its request retried once, and never keeps slots."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from veil.platform import PlatformError


def test_crash_during_request_is_replaced_and_retried(platform, echo_spec, tmp_path):
    platform.deploy(echo_spec())
    first_pid = platform.invoke("echo", {}, timeout=5)["pid"]
    marker = tmp_path / "crashed-once"
    r = platform.invoke("echo", {"crash_once": str(marker), "x": 1}, timeout=10)
    assert marker.exists()  # the first attempt really crashed the instance
    assert r["echo"]["x"] == 1 and r["pid"] != first_pid
    [info] = platform.instances("echo")
    assert info.pid == r["pid"] and info.inflight == 0
    m = platform.metrics("echo")
    assert m["crashes"] == 1 and m["retries"] == 1 and m["cold_starts"] == 2
    assert m["outcomes"] == {"ok": 2}


def test_crash_twice_gives_a_clear_error_and_frees_slots(platform, echo_spec):
    platform.deploy(echo_spec(concurrency=1, max_instances=1))
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {"crash": True}, timeout=10)
    e = ei.value
    assert e.code == "instance_crashed" and e.status == 502
    assert "'echo'" in e.message and "failed twice" in e.message
    assert "exited with code 3" in e.message and "retry" in e.message
    assert all(i.state != "dead" for i in platform.instances("echo"))
    # max_instances=1 and concurrency=1: had a dead instance kept its slot, this would block.
    assert platform.invoke("echo", {"ok": 1}, timeout=5)["echo"] == {"ok": 1}
    m = platform.metrics("echo")
    assert m["crashes"] == 2 and m["retries"] == 1
    assert m["outcomes"] == {"instance_crashed": 1, "ok": 1}


def test_other_inflight_requests_on_a_crashed_instance_are_retried(platform, echo_spec, tmp_path):
    platform.deploy(echo_spec(concurrency=4, max_instances=2))
    platform.start_instance("echo")
    results: list = []

    def slow() -> None:
        try:
            results.append(platform.invoke("echo", {"sleep": 0.5}, timeout=10))
        except Exception as e:  # surfaced by the assertion below
            results.append(e)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    marker = tmp_path / "boom"
    crash = platform.invoke("echo", {"sleep": 0.1, "crash_once": str(marker)}, timeout=10)
    for t in threads:
        t.join(10)
    assert len(results) == 2 and all(isinstance(r, dict) for r in results), results
    assert all(r["echo"] == {"sleep": 0.5} for r in results)
    assert len({r["pid"] for r in results} | {crash["pid"]}) == 1  # all on the replacement
    assert platform.metrics("echo")["retries"] == 3


def test_instance_that_dies_while_idle_is_removed_and_replaced(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(min_instances=1, idle_timeout_s=60))
    assert wait_until(lambda: [i.state for i in platform.instances("echo")] == ["ready"])
    victim = platform.instances("echo")[0]
    os.kill(victim.pid, signal.SIGKILL)
    assert wait_until(
        lambda: (
            [i.state for i in platform.instances("echo")] == ["ready"]
            and platform.instances("echo")[0].pid != victim.pid
        )
    )
    assert platform.metrics("echo")["crashes"] == 1
    with pytest.raises(PlatformError) as ei:
        platform.invoke_instance("echo", victim.id, {}, timeout=1)
    assert ei.value.code == "instance_crashed" and victim.id in ei.value.message


def test_invoke_instance_is_not_retried_after_a_crash(platform, echo_spec):
    platform.deploy(echo_spec())
    iid = platform.start_instance("echo")
    with pytest.raises(PlatformError) as ei:
        platform.invoke_instance("echo", iid, {"crash": True}, timeout=5)
    assert ei.value.code == "instance_crashed" and "not retried" in ei.value.message
    assert platform.instances("echo") == []
    m = platform.metrics("echo")
    assert m["crashes"] == 1 and m["retries"] == 0 and m["cold_starts"] == 1
