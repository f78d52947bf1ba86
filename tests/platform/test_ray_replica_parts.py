"""The parts of a Ray Serve replica that need no Ray: the runtime supervisor (real subprocesses of
the echo action), the lifeline that kills a runtime with its owner, the wire format across the
handle, per-replica model keep-alive, the autoscaling rule and the option mapping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from veil.platform import ActionError, FunctionSpec, PlatformError
from veil.platform.protocol import Routing
from veil.platform.ray_serve import RayOptions, deployment_options, wire
from veil.platform.ray_serve.autoscale import desired_replicas
from veil.platform.ray_serve.models import ReplicaModels
from veil.platform.ray_serve.supervisor import RuntimeSupervisor

ECHO = [sys.executable, str(Path(__file__).with_name("echo_action.py"))]


def echo(name: str = "echo", **kw: object) -> FunctionSpec:
    kw.setdefault("start_timeout_s", 10.0)
    return FunctionSpec(name=name, command=list(ECHO), **kw)  # type: ignore[arg-type]


@pytest.fixture
def supervisor(tmp_path: Path):
    made: list[RuntimeSupervisor] = []

    def make(spec: FunctionSpec, **kw: object) -> RuntimeSupervisor:
        s = RuntimeSupervisor(spec, replica_id="r1", log_dir=tmp_path / "logs", **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_runs_the_runtime_on_loopback_with_the_platform_env(supervisor):
    sup = supervisor(echo(env={"VEIL_HOST": "0.0.0.0"}))
    assert sup.start() is None
    answer = sup.run({"x": 1}, 10.0)
    out = wire.result(answer, "echo")
    assert out["echo"] == {"x": 1}
    env = out["env"]
    assert env["VEIL_HOST"] == "127.0.0.1"  # forced after the spec's env: nothing widens the bind
    assert env["__OW_API_HOST"] == "ray" and env["VEIL_FUNCTION"] == "echo"
    assert out["activation"]["action_name"] == "/guest/echo"


def test_action_errors_cross_as_the_same_action_error(supervisor):
    sup = supervisor(echo())
    sup.start()
    answer = sup.run({"fail": True}, 10.0)
    with pytest.raises(ActionError) as ei:
        wire.result(answer, "echo")
    assert ei.value.status == 400 and ei.value.to_json() == {"error": {"code": "bad_input", "message": "asked to fail"}}


def test_a_crash_is_replaced_and_retried_once(supervisor, tmp_path: Path):
    sup = supervisor(echo())
    sup.start()
    pid = sup.stats()["runtime_pid"]
    out = wire.result(sup.run({"crash_once": str(tmp_path / "marker")}, 10.0), "echo")
    assert out["pid"] != pid
    assert sup.stats()["crashes"] == 1 and sup.stats()["retries"] == 1
    with pytest.raises(PlatformError) as ei:
        wire.result(sup.run({"crash": True}, 10.0), "echo")
    assert ei.value.code == "instance_crashed" and ei.value.status == 502
    assert "failed twice" in ei.value.message
    assert wire.result(sup.run({"x": 2}, 10.0), "echo")["echo"] == {"x": 2}  # and it recovers


def test_failing_starts_back_off_with_a_clear_error(supervisor):
    sup = supervisor(echo(init_value={"init_fail": True}), backoff_base_s=5.0)
    first = sup.start()
    assert first is not None and first.code == "start_failed" and "/init answered 502" in first.message
    t0 = time.monotonic()
    with pytest.raises(PlatformError) as ei:
        wire.result(sup.run({"x": 1}, 10.0), "echo")
    assert time.monotonic() - t0 < 1.0  # no new start while backing off: the error comes at once
    assert ei.value.code == "start_failed" and "next attempt in" in ei.value.message
    assert sup.stats()["start_failures"] == 1


def test_a_runtime_that_died_idle_is_replaced_by_the_health_check(supervisor):
    sup = supervisor(echo())
    sup.start()
    pid = sup.stats()["runtime_pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=5)
    sup.check()
    assert sup.stats()["runtime_pid"] not in (None, pid)
    assert wire.result(sup.run({"x": 3}, 10.0), "echo")["echo"] == {"x": 3}


def test_the_runtime_dies_with_its_owner_killed_hard(tmp_path: Path):
    """The replica's worker can be kill -9'd; its runtime must not stay listening."""
    script = tmp_path / "owner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, threading, time
            from pathlib import Path
            from veil.platform import FunctionSpec
            from veil.platform.ray_serve.supervisor import RuntimeSupervisor
            spec = FunctionSpec("echo", {ECHO!r}, start_timeout_s=10.0)
            sup = RuntimeSupervisor(spec, replica_id="r9", log_dir=Path({str(tmp_path)!r}))
            # start from a short-lived thread: the runtime must outlive it, and die with us only
            t = threading.Thread(target=sup.start); t.start(); t.join()
            print(sup.stats()["runtime_pid"], flush=True)
            time.sleep(60)
            """
        )
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(owner.stdout.readline())
        runtime = psutil.Process(pid)
        time.sleep(0.3)
        assert runtime.is_running(), "the runtime died with the thread that started it"
        owner.kill()
        owner.wait(timeout=5)
        runtime.wait(timeout=5)  # the kernel killed it
        assert not psutil.pid_exists(pid) or runtime.status() == psutil.STATUS_ZOMBIE
    finally:
        owner.kill()
        owner.wait(timeout=5)


def test_wire_round_trip_rebuilds_veil_errors_without_tracebacks():
    err = PlatformError("busy", "function 'f' is busy", detail="operator only")
    with pytest.raises(PlatformError) as ei:
        wire.result(wire.error(err), "f")
    assert (ei.value.code, ei.value.status, ei.value.message, ei.value.detail) == (
        "busy",
        503,
        "function 'f' is busy",
        "operator only",
    )
    act = ActionError("f", {"code": "integrity", "message": "tampered", "envelope": {"v": 1}}, 400)
    with pytest.raises(ActionError) as ai:
        wire.result(wire.error(act), "f")
    assert ai.value.body == act.body and ai.value.status == 400 and ai.value.to_json() == act.to_json()
    with pytest.raises(PlatformError) as bad:
        wire.result({"something": "else"}, "f")
    assert bad.value.code == "platform_error"
    assert wire.result(wire.ok({"y": 1}), "f") == {"y": 1}


def test_replica_models_keep_alive_and_liveness():
    now = [0.0]
    models = ReplicaModels(60.0, clock=lambda: now[0])
    assert not models.live()
    assert models.begin("a", keepalive_s=2.0) is True
    assert models.live()
    models.end("a")
    assert models.begin("b") is True and models.begin("a") is False
    models.end("a")
    models.end("b")
    now[0] = 1.0
    assert models.evict(["b", "zz"]) == ["b"]
    now[0] = 1.5
    assert models.live()  # a's window (last used at 0, keep-alive 2 s) ends at 2.0
    now[0] = 2.5
    assert models.expire() == ["a"] and not models.live()


def test_autoscaling_rule_keeps_live_replicas():
    assert desired_replicas(0.0, 3.2, 0, 0) == 0.0
    assert desired_replicas(6.4, 3.2, 0, 1) == pytest.approx(2.0)
    assert desired_replicas(0.1, 3.2, 3, 3) == 3.0  # load wants fewer, three still hold live models
    assert desired_replicas(0.0, 3.2, 0, 2) == 0.0  # nothing live, nothing running: may go to zero


def test_veil_routing_installs_the_router_and_the_autoscaling_policy():
    spec = echo("veil-tee", memory_mb=512, concurrency=4, idle_timeout_s=30.0)
    o = deployment_options(spec, Routing("veil", base_mb=100.0, model_mb={"m": 50.0}), RayOptions(num_cpus=0.5))
    router = o["request_router_config"]
    assert router["request_router_class"] == "veil.packer.ray_router:VeilRequestRouter"
    assert router["request_router_kwargs"]["model_mb"] == {"m": 50.0}
    a = o["autoscaling_config"]
    assert a["policy"]["policy_function"] == "veil.platform.ray_serve.autoscale:veil_autoscaling_policy"
    assert a["look_back_period_s"] <= 1.0 and a["metrics_interval_s"] <= 0.5
    assert a["upscale_delay_s"] == RayOptions().veil_upscale_delay_s > 0  # bursts drain on warm replicas first
    assert o["ray_actor_options"]["num_cpus"] == 0.5
    assert o["logging_config"] == {"enable_access_log": False}
    default = deployment_options(spec, Routing("platform"))
    assert "request_router_class" not in default["request_router_config"]
    assert "policy" not in default["autoscaling_config"]
    assert default["autoscaling_config"]["downscale_delay_s"] == 30.0
    assert default["autoscaling_config"]["upscale_delay_s"] == 0  # the baseline scales out at once


def test_the_async_path_answers_and_retries_as_the_sync_one(supervisor, tmp_path: Path):
    import asyncio

    aiohttp = pytest.importorskip("aiohttp")

    sup = supervisor(echo())
    sup.start()

    async def go() -> list[dict]:
        async with aiohttp.ClientSession() as client:
            ok = await sup.run_async(client, {"x": 1}, 10.0)
            encoded = await sup.run_async(client, b'{"x": [1, 2]}', 10.0)  # as the Ray platform sends it
            crash_once = await sup.run_async(client, {"crash_once": str(tmp_path / "m")}, 10.0)
            fail = await sup.run_async(client, {"fail": True}, 10.0)
            slow = await sup.run_async(client, {"sleep": 2}, 0.3)
            not_object = await sup.run_async(client, b"[1]", 10.0)
            return [ok, encoded, crash_once, fail, slow, not_object]

    ok, encoded, crash_once, fail, slow, not_object = asyncio.run(go())
    assert "raw" in ok  # the runtime's answer crosses undecoded
    assert wire.result(ok, "echo")["echo"] == {"x": 1}
    assert wire.result(encoded, "echo")["echo"] == {"x": [1, 2]}
    with pytest.raises(PlatformError) as bad:
        wire.result(not_object, "echo")
    assert bad.value.code == "bad_request" and bad.value.status == 400
    assert wire.result(crash_once, "echo")["echo"] == {"crash_once": str(tmp_path / "m")}
    assert sup.stats()["crashes"] == 1 and sup.stats()["retries"] == 1
    with pytest.raises(ActionError):
        wire.result(fail, "echo")
    with pytest.raises(PlatformError) as ei:
        wire.result(slow, "echo")
    assert ei.value.code == "timeout" and ei.value.status == 504
