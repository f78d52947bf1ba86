"""Veil on a real Ray cluster on this machine: a head and a second node (`ray start`, node IPs
127.0.0.2 and 127.0.0.3, dashboard off, token authentication, fractional CPUs per replica), the
Ray platform deploying real subprocesses (the echo action, then Veil's runtime against the real
KeyService of the e2e stack), compared with the local platform on the same requests.

Checks: answers and error codes equal the local platform's; failing starts back off with a clear
error; a model stays on the replica that has it (Veil's router and Serve's default one); a killed
runtime and a killed Ray worker are replaced (the request in flight is retried); scale to zero
leaves no process behind; the cold start from zero replicas; a whole deployment on Ray
(`LocalDeployment(platform="ray")`, the API of `veil up --platform ray`) whose replicas run on
the second node and read models from the network store (`veil store serve`); and `veil up
--platform ray` starting and stopping its own Ray head.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

pytest.importorskip("ray.serve")

from e2e_support import CLIENT_TIMEOUT_S, assert_matches_reference, error_of, gateway_post, wait_until  # noqa: E402
from ray_support import echo_spec, local_cluster, platform_on  # noqa: E402

from veil.crypto.encoding import b64d, b64e  # noqa: E402
from veil.errors import VeilError  # noqa: E402
from veil.platform import ActionError, FunctionSpec, LocalPlatform, PlatformError  # noqa: E402
from veil.platform.protocol import Routing  # noqa: E402
from veil.platform.ray_serve import RayOptions  # noqa: E402
from veil.platform.ray_serve.cluster import LocalRayCluster  # noqa: E402
from veil.platform.ray_serve.platform import RayPlatform  # noqa: E402
from veil.ray_deployment import GatewayServer, gateway_on_platform  # noqa: E402
from veil.sdk import Deployment, ModelUser  # noqa: E402

VEIL = Routing("veil")
SERVE_DEFAULT = Routing("platform")

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with local_cluster("vr-") as c:
        yield c


@pytest.fixture(scope="module")
def ray_platform(cluster: LocalRayCluster) -> Iterator[RayPlatform]:
    with platform_on(cluster) as p:
        yield p


@pytest.fixture(scope="module")
def local_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPlatform]:
    with LocalPlatform(log_dir=tmp_path_factory.mktemp("local-logs"), reap_interval_s=0.05) as p:
        yield p


def both(ray_platform: RayPlatform, local_platform: LocalPlatform, spec: FunctionSpec, routing=VEIL):
    ray_platform.deploy(spec, routing=routing)
    local_platform.deploy(spec)
    return ray_platform, local_platform


def outcome(platform, name: str, value, **kw) -> tuple[str, int, dict]:
    try:
        platform.invoke(name, value, **kw)
    except PlatformError as e:
        assert "Traceback" not in e.message and "ray." not in e.message.lower(), e.message
        return e.code, e.status, e.to_json()
    return "ok", 200, {}


def runtime_pids(replicas: list[dict]) -> set[int]:
    return {r["runtime_pid"] for r in replicas if r.get("runtime_pid")}


def gone(pids: set[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


# -- the echo action: platform behaviour ------------------------------------------------------


def test_answers_and_error_codes_equal_the_local_platform(ray_platform, local_platform):
    ray_p, local_p = both(ray_platform, local_platform, echo_spec("echo", init_value={"mode": "test"}))
    for value in ({"x": 1}, {"nested": {"a": [1, 2, 3]}}):
        got, want = ray_p.invoke("echo", value, model="m1"), local_p.invoke("echo", value)
        assert got["echo"] == want["echo"] == value and got["init"] == want["init"] == {"mode": "test"}
        assert got["activation"]["action_name"] == want["activation"]["action_name"] == "/guest/echo"
        assert got["env"]["VEIL_HOST"] == "127.0.0.1"  # the runtime binds loopback under Ray
    cases = [
        ({"fail": True}, {}),  # the action's own error: status and body kept
        ({"crash": True}, {}),  # crashes on the retry too: instance_crashed
        ({"sleep": 3}, {"timeout": 0.5}),  # no answer in time
        ({"bad": {1, 2}}, {}),  # not JSON
    ]
    for value, kw in cases:
        r, loc = outcome(ray_p, "echo", value, model="m1", **kw), outcome(local_p, "echo", value, **kw)
        assert r[:2] == loc[:2], (value, r, loc)
        if r[0] == "action_error":
            assert r[2] == loc[2] == {"error": {"code": "bad_input", "message": "asked to fail"}}
    assert outcome(ray_p, "nope", {})[:2] == outcome(local_p, "nope", {})[:2] == ("unknown_function", 404)
    with pytest.raises(ActionError) as ei:
        ray_p.invoke("echo", {"fail": True}, model="m1")
    assert ei.value.status == 400 and ei.value.body == {"code": "bad_input", "message": "asked to fail"}


def test_failing_starts_back_off_with_a_clear_error(ray_platform, local_platform):
    spec = echo_spec("broken", init_value={"init_fail": True}, max_instances=1)
    ray_p, local_p = both(ray_platform, local_platform, spec)
    try:
        r, loc = outcome(ray_p, "broken", {"x": 1}, timeout=30), outcome(local_p, "broken", {"x": 1}, timeout=30)
        assert r[:2] == loc[:2] == ("start_failed", 502)
        t0 = time.monotonic()
        messages = []
        for _ in range(8):
            with pytest.raises(PlatformError) as ei:
                ray_p.invoke("broken", {"x": 1}, timeout=30)
            assert ei.value.code == "start_failed" and "/init answered 502" in ei.value.message, ei.value
            messages.append(ei.value.message)
        assert time.monotonic() - t0 < 6.0, "requests must not wait for starts that keep failing"
        assert any("next attempt in" in m for m in messages), messages
        [replica] = ray_p.replicas("broken")
        assert replica["start_failures"] <= 4, replica  # backed off: far fewer starts than requests
    finally:
        ray_p.remove("broken")
        local_p.remove("broken")


@pytest.mark.parametrize("routing", [VEIL, SERVE_DEFAULT], ids=["veil-router", "serve-router"])
def test_a_model_stays_on_the_replica_that_has_it(ray_platform, routing):
    name = f"affinity-{routing.policy}"
    ray_platform.deploy(echo_spec(name, min_instances=2, max_instances=2, idle_timeout_s=30.0), routing=routing)
    try:
        assert wait_until(lambda: ray_platform.metrics(name)["ready"] == 2, 30), "two replicas did not start"

        def round_() -> dict[str, str]:
            out = {}
            for model in ("A", "B", "C"):
                env = ray_platform.invoke(name, {"model": model}, model=model)["env"]
                out[model] = env["VEIL_INSTANCE_ID"].rsplit("-", 1)[0]  # <function>-<replica>
            return out

        first = round_()
        if routing is SERVE_DEFAULT:
            time.sleep(1.0)  # Serve's router learns which replica holds a model from the controller
        rounds = [round_() for _ in range(4)]
        if routing is VEIL:
            rounds.insert(0, first)  # Veil's router knows at once: it placed the model itself
        for model in ("A", "B", "C"):
            assert len({r[model] for r in rounds}) == 1, (model, rounds)
        held = {m: {r["replica_id"] for r in ray_platform.replicas(name) if m in r["models"]} for m in "ABC"}
        if routing is VEIL:
            assert all(len(h) == 1 for h in held.values()), held
        nodes = {r["node_id"] for r in ray_platform.replicas(name)}
        assert len(nodes) >= 1
    finally:
        ray_platform.remove(name)


def test_killed_runtime_and_killed_worker_are_replaced_then_scale_to_zero(ray_platform, cluster, tmp_path):
    ray_platform.deploy(echo_spec("heal", max_instances=1), routing=VEIL)
    first = ray_platform.invoke("heal", {"x": 0}, model="m1")
    [replica] = ray_platform.replicas("heal")
    seen = runtime_pids([replica])

    # the runtime is killed: the replica replaces it and retries the request once
    os.kill(replica["runtime_pid"], signal.SIGKILL)
    again = ray_platform.invoke("heal", {"x": 1}, model="m1")
    assert again["pid"] != first["pid"]
    [after] = ray_platform.replicas("heal")
    assert after["worker_pid"] == replica["worker_pid"] and after["crashes"] == 1 and after["retries"] == 1
    seen |= runtime_pids([after])

    # the Ray worker is killed with a request in flight: Serve replaces the replica, the platform
    # retries the request, and the runtime of the killed worker dies with it
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(out=ray_platform.invoke("heal", {"sleep": 0.5}, model="m1", timeout=60))
    )
    thread.start()
    time.sleep(0.2)
    os.kill(after["worker_pid"], signal.SIGKILL)
    thread.join(timeout=60)
    assert result.get("out", {}).get("echo") == {"sleep": 0.5}
    assert wait_until(lambda: gone({after["runtime_pid"]}), 10), "the runtime outlived its replica"
    [fresh] = ray_platform.replicas("heal")
    assert fresh["worker_pid"] != after["worker_pid"]
    seen |= runtime_pids([fresh])
    m = ray_platform.metrics("heal")
    assert m["retries"] >= 1 and m["cold_starts"] >= 2 and m["gb_seconds"] > 0, m
    cluster.remember_processes()

    # idle: keep-alive (2 s) ends, the replica goes, nothing of it is left running
    assert wait_until(lambda: ray_platform.metrics("heal")["instances"] == 0, 30), ray_platform.metrics("heal")
    assert wait_until(lambda: gone(seen), 10), "a runtime process survived scale to zero"

    # cold start from zero replicas
    t0 = time.monotonic()
    assert ray_platform.invoke("heal", {"x": 2}, model="m1", timeout=60)["echo"] == {"x": 2}
    cold_s = time.monotonic() - t0
    print(f"cold start from zero replicas: {cold_s * 1000:.0f} ms")
    assert cold_s < 10.0
    ray_platform.remove("heal")


# -- the real runtime: TEE inference with the e2e stack's KeyService ---------------------------


@pytest.fixture(scope="module")
def ray_gateway(stack, ray_platform) -> Iterator[GatewayServer]:
    """The gateway app, unchanged, in front of the packer on the Ray platform."""
    gw = gateway_on_platform(stack.deployment, ray_platform, policy="veil")
    try:
        yield gw
    finally:
        gw.close()


def test_real_runtime_answers_and_error_codes_equal_the_local_platform(stack, ray_gateway):
    ray_user = ModelUser(
        Deployment(gateway_url=ray_gateway.url, keyservice_url=stack.info.keyservice_url),
        stack.user.identity,
        trust=stack.trust,
        timeout=CLIENT_TIMEOUT_S,
    )
    ray_user.request_keys = stack.user.request_keys
    try:
        for model_id, model in stack.models.items():
            x = model.x_test[:4]
            got, want = ray_user.infer(model_id, x), stack.infer(stack.user, model_id, x)
            assert sorted(got) == sorted(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])
            assert_matches_reference(model, x, got)

        model_id = next(iter(stack.models))
        x = stack.models[model_id].x_test[:1]
        path = f"/v1/models/{model_id}:infer"
        ray_stack = _Via(stack, ray_gateway.url)
        # a flipped ciphertext bit: the runtime refuses it (integrity)
        _, env = stack.user.sealed_request(model_id, {"input": x})
        ct = bytearray(b64d(env["ct"]))
        ct[len(ct) // 2] ^= 1
        bad = {**env, "ct": b64e(bytes(ct))}
        r_local, r_ray = gateway_post(stack, path, bad), gateway_post(ray_stack, path, bad)
        assert r_local.status_code == r_ray.status_code == 400
        assert error_of(r_local)["code"] == error_of(r_ray)["code"] == "integrity"
        # a response replayed as a request: refused by name (malformed direction)
        ok = gateway_post(ray_stack, path, stack.user.sealed_request(model_id, {"input": x})[1])
        assert ok.status_code == 200, ok.text
        replay = ok.json()["envelope"]
        r_local, r_ray = gateway_post(stack, path, replay), gateway_post(ray_stack, path, replay)
        assert (r_local.status_code, error_of(r_local)["code"]) == (r_ray.status_code, error_of(r_ray)["code"])
        # an input of the wrong shape: the runtime's error, opened by the user, is the same
        wrong = np.zeros((1, x.shape[1] + 3), dtype=x.dtype)
        codes = []
        for user in (stack.user, ray_user):
            with pytest.raises(VeilError) as ei:
                user.infer(model_id, wrong)
            codes.append((ei.value.code, ei.value.status))
        assert codes[0] == codes[1], codes
    finally:
        ray_user.close()


class _Via:
    """What `gateway_post` needs of a stack, pointing at another gateway."""

    def __init__(self, stack, url: str) -> None:
        self.info = Deployment(gateway_url=url, keyservice_url=stack.info.keyservice_url)


# -- `veil up --platform ray` / LocalDeployment(platform="ray") --------------------------------


def test_deployment_on_ray_publishes_and_infers_like_the_local_platform(stack, make_stack, cluster):
    """The Python API of `veil up --platform ray --address ADDR --serve-store`: a whole
    deployment (its own KeyService, store service, gateway) whose TEE runtime is a Ray Serve
    application on the cluster, routed by Veil's router, its replicas pinned to the second node
    (Ray's `node:<ip>` resource), which reads sealed models from the network store; its owner
    publishes, its user infers, answers equal the local platform's, and so does a runtime
    error. Stopping it deletes its application only."""
    import ray

    worker_ip = cluster.worker_ips[0]
    options = RayOptions(resources={f"node:{worker_ip}": 0.001}, log_dir=str(cluster.root / "up-logs"))
    ray_stack = make_stack(
        platform="ray",
        ray_address=cluster.address,
        ray_app_prefix="up-",
        packer_policy="veil",
        ray_options=options,
        serve_store=True,
    )
    platform = ray_stack.platform
    assert platform.kind == "ray" and ray_stack.info.extra["platform"] == "ray"
    assert ray_stack.info.extra["ray_address"] == cluster.address
    store_url = ray_stack.deployment.store_location
    assert store_url.startswith("http://127.0.0.1:") and ray_stack.deployment.tee_spec.init_value["store"] == store_url
    requests = 0
    for model_id, model in ray_stack.models.items():
        x = model.x_test[:4]
        got, want = ray_stack.infer(ray_stack.user, model_id, x), stack.infer(stack.user, model_id, x)
        requests += 1
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        assert_matches_reference(model, x, got)
    m = platform.metrics("veil-tee")
    assert m["router"] == "veil" and m["requests"] >= requests and m["cold_starts"] >= 1, m
    model_id = next(iter(ray_stack.models))
    x_test = ray_stack.models[model_id].x_test
    wrong = np.zeros((1, x_test.shape[1] + 3), dtype=x_test.dtype)
    codes = []
    for s in (stack, ray_stack):
        with pytest.raises(VeilError) as ei:
            s.user.infer(model_id, wrong)
        codes.append((ei.value.code, ei.value.status))
    assert codes[0] == codes[1], codes
    [replica] = [r for r in platform.replicas("veil-tee") if model_id in r["models"]]
    worker_node = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}[worker_ip]
    assert all(r["node_id"] == worker_node for r in platform.replicas("veil-tee")), "not on the second node"
    pids = runtime_pids([replica])
    ray_stack.close()
    from ray import serve

    assert "up-veil-tee" not in serve.status().applications
    assert wait_until(lambda: gone(pids), 15), "the deployment's runtime outlived it"


def test_veil_up_platform_ray_starts_and_stops_its_own_ray_head(tmp_path):
    """`veil up --platform ray` without --address: a one-node Ray head on loopback, started for
    the deployment and stopped with it (nothing of it left running), Ray's default router."""
    import json
    import subprocess

    import httpx

    root = tmp_path / "v"
    cmd = [sys.executable, "-m", "veil.cli", "up", "--dir", str(root), "--platform", "ray"]
    cmd += ["--ray-node-ip", "127.0.0.4", "--policy", "platform", "--gateway-port", "0", "--keyservice-port", "0"]
    log = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # not the module cluster's
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        assert wait_until(lambda: b"Ctrl-C" in log.read_bytes() or proc.poll() is not None, 120), log.read_text()
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "platform     ray at 127.0.0.4:" in text and "started here" in text, text
        info = json.loads((root / "deployment.json").read_text())
        assert info["platform"] == "ray" and info["ray_address"].startswith("127.0.0.4:")
        assert httpx.get(f"{info['gateway_url']}/healthz", timeout=10).status_code == 200
        descendants = {p.pid: p.create_time() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert any("raylet" in " ".join(_cmdline(pid)) for pid in descendants), "no Ray head was started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def left() -> list[int]:
        out = []
        for pid, created in descendants.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                pass
        return out

    assert wait_until(lambda: not left(), 15), [_cmdline(p) for p in left()]


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []
