"""LocalPlatform basics against a real OpenWhisk-protocol action subprocess (echo_action.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import pytest

from veil.platform import ActionError, FunctionSpec, LocalPlatform, PlatformError


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cold_start_then_warm_hit(platform, echo_spec):
    platform.deploy(echo_spec(init_value={"model": "m1"}))
    assert platform.instances("echo") == []

    first = platform.invoke("echo", {"x": 1}, timeout=10)
    m = platform.metrics("echo")
    assert (m["cold_starts"], m["cold_hits"], m["warm_hits"]) == (1, 1, 0)
    assert first["echo"] == {"x": 1}
    assert first["init"] == {"model": "m1"}  # /init got {"value": init_value}

    t = time.monotonic()
    second = platform.invoke("echo", {"x": 2}, timeout=10)
    warm_s = time.monotonic() - t
    assert second["pid"] == first["pid"]  # same instance, no new process
    assert second["runs"] == 2
    m = platform.metrics("echo")
    assert (m["cold_starts"], m["warm_hits"], m["requests"]) == (1, 1, 2)
    assert warm_s < m["cold_start_ms"]["max"] / 1000 + 0.5
    [info] = platform.instances("echo")
    assert info.pid == first["pid"] and info.state == "ready" and info.requests == 2
    assert info.inflight == 0 and info.port > 0 and info.memory_mb == 512


def test_openwhisk_environment_and_activation_fields(platform, echo_spec):
    platform.deploy(echo_spec(namespace="ns1", env={"EXTRA": "1"}))
    before_ms = time.time() * 1000
    r = platform.invoke("echo", {}, timeout=5)
    env = r["env"]
    assert env["__OW_ACTION_NAME"] == "/ns1/echo"
    assert env["__OW_NAMESPACE"] == "ns1"
    assert env["__OW_API_HOST"] == "local"
    assert env["VEIL_PORT"] == str(platform.instances("echo")[0].port)
    assert env["VEIL_THREADS"] == "4"  # the runtime's request threads follow concurrency
    act = r["activation"]
    assert len(act["activation_id"]) == 32 and int(act["activation_id"], 16) >= 0
    assert act["action_name"] == "/ns1/echo" and act["namespace"] == "ns1"
    assert before_ms < int(act["deadline"]) <= time.time() * 1000 + 5000
    other = platform.invoke("echo", {}, timeout=5)["activation"]["activation_id"]
    assert other != act["activation_id"]


def test_action_error_keeps_body_and_status_and_instance_stays_warm(platform, echo_spec):
    platform.deploy(echo_spec())
    with pytest.raises(ActionError) as ei:
        platform.invoke("echo", {"fail": True}, timeout=5)
    e = ei.value
    assert e.status == 400 and e.code == "action_error"
    assert e.body == {"code": "bad_input", "message": "asked to fail"}
    assert e.to_json() == {"error": {"code": "bad_input", "message": "asked to fail"}}
    assert "'echo'" in e.message
    assert platform.invoke("echo", {"ok": 1}, timeout=5)["echo"] == {"ok": 1}
    m = platform.metrics("echo")
    assert m["cold_starts"] == 1 and m["crashes"] == 0
    assert m["outcomes"] == {"action_error": 1, "ok": 1}


def test_unknown_function_and_bad_values(platform, echo_spec):
    with pytest.raises(PlatformError) as ei:
        platform.invoke("nope", {}, timeout=1)
    assert ei.value.code == "unknown_function" and ei.value.status == 404
    assert "'nope'" in ei.value.message
    platform.deploy(echo_spec())
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {"x": object()}, timeout=1)
    assert ei.value.status == 400
    with pytest.raises(PlatformError) as ei:
        platform.deploy(echo_spec(concurrency=0))
    assert ei.value.code == "bad_spec" and "concurrency" in ei.value.message
    assert platform.instances("echo") == []  # nothing was started for refused calls


def test_start_failure_is_clear_and_does_not_hang(platform):
    platform.deploy(FunctionSpec("broken", [sys.executable, "-c", "import sys; sys.exit(7)"]))
    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("broken", {}, timeout=10)
    assert time.monotonic() - t < 5
    e = ei.value
    assert e.code == "start_failed" and e.status == 502
    assert "'broken'" in e.message and "exited with code 7" in e.message
    assert platform.instances("broken") == []
    m = platform.metrics("broken")
    assert m["start_failures"] == 1 and m["cold_starts"] == 0 and m["instances"] == 0


def test_init_error_is_start_failed_with_the_action_message(platform, echo_spec):
    platform.deploy(echo_spec(init_value={"init_fail": True}))
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {}, timeout=10)
    assert ei.value.code == "start_failed"
    assert "/init answered 502" in ei.value.message and "asked to fail" in ei.value.message


def test_start_timeout_when_the_port_never_answers(platform):
    never = FunctionSpec("mute", [sys.executable, "-c", "import time; time.sleep(60)"], start_timeout_s=0.8)
    platform.deploy(never)
    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("mute", {}, timeout=10)
    assert ei.value.code == "start_failed" and "start timeout" in ei.value.message
    assert time.monotonic() - t < 3
    # An invoke with a shorter deadline than the start gives up at its own deadline.
    platform.deploy(FunctionSpec("mute", never.command, start_timeout_s=5))
    t = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        platform.invoke("mute", {}, timeout=0.4)
    assert ei.value.code == "timeout" and ei.value.status == 504
    assert "cold start" in ei.value.message
    assert time.monotonic() - t < 1.5


def test_output_flood_does_not_block_the_instance(platform, echo_spec, tmp_path):
    platform.deploy(echo_spec())
    r = platform.invoke("echo", {"spam": 1_000_000}, timeout=20)  # far beyond a 64 KiB pipe
    assert r["echo"]["spam"] == 1_000_000
    [info] = platform.instances("echo")
    log_file = tmp_path / "logs" / f"{info.id}.log"
    assert str(log_file) == info.log_path
    assert log_file.stat().st_size >= 1_900_000  # stdout + stderr, whole 1025-byte lines


def test_packer_api_start_invoke_keep_alive_stop(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(max_instances=2, idle_timeout_s=60))
    a = platform.start_instance("echo")
    b = platform.start_instance("echo")
    assert a != b
    with pytest.raises(PlatformError) as ei:
        platform.start_instance("echo")
    assert ei.value.code == "busy" and "max_instances=2" in ei.value.message
    infos = {i.id: i for i in platform.instances("echo")}
    assert set(infos) == {a, b} and all(i.state == "ready" for i in infos.values())
    assert platform.invoke_instance("echo", b, {"n": 1}, timeout=5)["pid"] == infos[b].pid
    assert platform.invoke_instance("echo", a, {"n": 2}, timeout=5)["pid"] == infos[a].pid

    platform.set_keep_alive("echo", a, 0.1)  # only `a` idles out
    assert wait_until(lambda: [i.id for i in platform.instances("echo")] == [b], timeout=5)
    assert wait_until(lambda: _gone(infos[a].pid))
    with pytest.raises(PlatformError) as ei:
        platform.invoke_instance("echo", a, {}, timeout=1)
    assert ei.value.code == "unknown_instance" and "idle timeout" in ei.value.message

    platform.stop_instance("echo", b)
    assert platform.instances("echo") == []
    with pytest.raises(PlatformError) as ei:
        platform.stop_instance("echo", b)
    assert ei.value.code == "unknown_instance"
    assert platform.metrics("echo")["cold_starts"] == 2


def test_stop_instance_lets_inflight_requests_finish(platform, echo_spec):
    platform.deploy(echo_spec())
    iid = platform.start_instance("echo")
    import threading

    out: dict = {}
    t = threading.Thread(target=lambda: out.update(platform.invoke("echo", {"sleep": 0.4}, timeout=5)))
    t.start()
    time.sleep(0.1)
    platform.stop_instance("echo", iid, drain_s=5)
    t.join(5)
    assert out["echo"] == {"sleep": 0.4}
    assert platform.instances("echo") == []


def test_redeploy_with_new_init_drains_old_instances(platform, echo_spec, wait_until):
    platform.deploy(echo_spec(init_value={"v": 1}))
    old = platform.invoke("echo", {}, timeout=5)
    platform.deploy(echo_spec(init_value={"v": 1}))  # same spec: idempotent, instance kept
    assert platform.invoke("echo", {}, timeout=5)["pid"] == old["pid"]
    platform.deploy(echo_spec(init_value={"v": 2}))
    new = platform.invoke("echo", {}, timeout=5)
    assert new["init"] == {"v": 2} and new["pid"] != old["pid"]
    assert wait_until(lambda: [i.pid for i in platform.instances("echo")] == [new["pid"]])
    # scaling knobs alone do not replace instances
    platform.deploy(echo_spec(init_value={"v": 2}, max_instances=3, idle_timeout_s=30))
    assert platform.invoke("echo", {}, timeout=5)["pid"] == new["pid"]
    assert platform.spec("echo").max_instances == 3


def test_remove_stops_instances_and_keeps_metrics(platform, echo_spec):
    platform.deploy(echo_spec())
    pid = platform.invoke("echo", {}, timeout=5)["pid"]
    platform.remove("echo")
    assert _gone(pid)
    with pytest.raises(PlatformError) as ei:
        platform.invoke("echo", {}, timeout=1)
    assert ei.value.code == "unknown_function"
    m = platform.metrics("echo")
    assert m["removed"] is True and m["instances"] == 0 and m["requests"] == 1
    json.dumps(platform.metrics())


def test_close_kills_every_instance(tmp_path, echo_spec):
    p = LocalPlatform(log_dir=tmp_path)
    p.deploy(echo_spec(max_instances=2, concurrency=1))
    pids = [p.instances("echo")[0].pid for _ in [p.start_instance("echo")]]
    pids.append(p.invoke("echo", {}, timeout=5)["pid"])
    p.close()
    p.close()  # idempotent
    for pid in pids:
        assert _gone(pid)
    with pytest.raises(PlatformError) as ei:
        p.invoke("echo", {}, timeout=1)
    assert ei.value.code == "closed"


def test_scale_and_unload_through_the_protocol(platform, echo_spec):
    from veil.platform.protocol import InstanceControl, Platform, Routing

    assert isinstance(platform, Platform) and isinstance(platform, InstanceControl)
    assert platform.routes_models is False
    platform.deploy(echo_spec("e", max_instances=1), routing=Routing(unload_value={"op": "unload"}))
    platform.invoke("e", {"x": 1}, model="m")
    assert platform.unload("e", "m") == 1  # the unload request reached the one ready instance
    platform.scale("e", min_instances=2, max_instances=3)
    assert (platform.spec("e").min_instances, platform.spec("e").max_instances) == (2, 3)
    assert platform.unload("e", "m") >= 1


def test_an_error_answered_200_keeps_the_status_it_names():
    import httpx

    from veil.platform.instance import Instance

    inst = Instance(
        instance_id="i",
        function="f",
        command=["true"],
        env={},
        memory_mb=1,
        concurrency=1,
        generation=0,
        log_path=Path("/dev/null"),
    )
    named = httpx.Response(200, json={"error": {"code": "integrity", "message": "m", "status": 400}})
    with pytest.raises(ActionError) as ei:
        inst._parse_run(named)
    assert ei.value.status == 400 and ei.value.body["code"] == "integrity"
    unnamed = httpx.Response(200, json={"error": {"code": "x", "message": "m"}})
    with pytest.raises(ActionError) as ei:
        inst._parse_run(unnamed)
    assert ei.value.status == 502
