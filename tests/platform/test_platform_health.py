"""Memory that is enforced and instances that stop answering: both are stopped and replaced.

Memory: an instance over its function's `memory_mb` is stopped (by a cgroup where this machine
allows one, by the RSS watchdog otherwise; both are tested), the request waiting on it fails
with `out_of_memory`, the platform's metrics count it, and the next request gets a new
instance. A real Veil runtime (`python -m veil.runtime`) given less memory than its own imports
take is stopped the same way. Health: a SIGSTOPped instance that lets a request pass its
deadline is probed, killed and replaced, and no later request is routed to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import pytest

from veil.platform.local import FunctionSpec, LocalPlatform, PlatformError
from veil.platform.memory import detect

MODES = ["watchdog"] + (["cgroup"] if detect("cgroup").kind.startswith("cgroup") else [])


@pytest.fixture(params=MODES)
def limited(request, tmp_path):
    p = LocalPlatform(log_dir=tmp_path / "logs", reap_interval_s=0.05, memory_enforcement=request.param)
    try:
        yield p
    finally:
        p.close()


def test_enforcer_kind_is_reported(limited):
    assert limited.memory_enforcement in ("watchdog", "cgroup-v1", "cgroup-v2")
    assert limited.metrics()["memory_enforcement"] == limited.memory_enforcement


def test_instance_over_its_memory_is_stopped_and_the_request_told(limited, echo_spec, wait_until):
    limited.deploy(echo_spec(memory_mb=96))
    first = limited.invoke("echo", {"alloc_mb": 8}, timeout=10)  # well under: served
    assert first["held_mb"] == 8
    with pytest.raises(PlatformError) as ei:
        limited.invoke("echo", {"alloc_mb": 400}, timeout=20)
    assert ei.value.code == "out_of_memory", ei.value
    assert "96 MB" in ei.value.message and ei.value.status == 502
    m = limited.metrics("echo")
    assert m["out_of_memory"] == 1 and m["outcomes"].get("out_of_memory") == 1
    assert wait_until(lambda: limited.instances("echo") == [])
    again = limited.invoke("echo", {}, timeout=10)  # a new instance serves the next request
    assert again["pid"] != first["pid"]


def test_real_runtime_over_its_memory_fails_its_start_with_out_of_memory(limited, tmp_path):
    """The runtime imports ONNX Runtime and NumPy at start (about 60 MB resident): 24 MB is too
    little, and the waiting request hears why."""
    limited.deploy(
        FunctionSpec(
            name="rt",
            command=[sys.executable, "-m", "veil.runtime"],
            memory_mb=24,
            start_timeout_s=30,
            init_value={"kind": "tee", "keyservice_url": "http://127.0.0.1:9", "store": str(tmp_path)},
        )
    )
    with pytest.raises(PlatformError) as ei:
        limited.invoke("rt", {}, timeout=30)
    assert ei.value.code == "out_of_memory", ei.value
    assert limited.metrics("rt")["out_of_memory"] >= 1


def test_sigstopped_instance_past_its_deadline_is_killed_and_replaced(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(min_instances=1, concurrency=2))
    assert wait_until(lambda: [i.state for i in platform.instances("echo")] == ["ready"])
    victim = platform.instances("echo")[0]
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(PlatformError) as ei:
            platform.invoke("echo", {}, timeout=1.0)
        assert ei.value.code == "timeout"
        # the probe finds it stopped: killed, counted, replaced (min_instances keeps one)
        assert wait_until(lambda: platform.metrics("echo")["unresponsive_killed"] == 1, timeout=5)
        assert wait_until(
            lambda: [(i.state, i.pid != victim.pid) for i in platform.instances("echo")] == [("ready", True)],
            timeout=10,
        )
        answer = platform.invoke("echo", {}, timeout=5)
        assert answer["pid"] != victim.pid
        assert time.monotonic() - t0 < 10
        with pytest.raises(PlatformError) as gone:
            platform.invoke_instance("echo", victim.id, {}, timeout=1)
        assert gone.value.code == "instance_crashed" and gone.value.sent is False
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGCONT)


def test_slow_but_alive_instance_is_kept(platform, echo_spec, wait_until):
    """A request past its deadline on an instance that still answers its health probe leaves
    the instance in service: slowness is not death."""
    platform.deploy(echo_spec(min_instances=1, concurrency=2))
    assert wait_until(lambda: [i.state for i in platform.instances("echo")] == ["ready"])
    pid = platform.instances("echo")[0].pid
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {"sleep": 2.0}, timeout=0.5)
    assert ei.value.code == "timeout"
    time.sleep(2.0)
    assert platform.metrics("echo")["unresponsive_killed"] == 0
    assert platform.invoke("echo", {}, timeout=5)["pid"] == pid
