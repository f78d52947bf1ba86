"""The cold start from zero replicas on a real Ray cluster takes a Ray worker that was started
before the request (`veil.platform.ray_serve.workers`): the head and a second node on loopback,
as tests/e2e/test_ray_cluster.py builds them (its fixtures, reused).

A deploy asks every node for an idle worker, and each replica, once up, asks its node for one
more; the nodes' workers preload Serve's and Veil's replica modules. So a replica started from
zero is created in a worker process that already existed when the request was sent, and scale to
zero still leaves no process of the function: the runtimes are gone, and the idle workers the
nodes keep hold no runtime and no function environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest

pytest.importorskip("ray.serve")

from e2e_support import wait_until  # noqa: E402
from test_ray_cluster import VEIL, cluster, echo_spec, gone, ray_platform, runtime_pids  # noqa: E402, F401

pytestmark = pytest.mark.timeout(180)


def node_processes(cluster) -> dict[int, float]:  # noqa: F811 (the fixture)
    """Every process under the cluster's nodes now (pid -> create time)."""
    out: dict[int, float] = {}
    for node in cluster.nodes:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(node.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    out[p.pid] = p.create_time()
    return out


def function_processes(cluster, name: str) -> list[int]:  # noqa: F811
    """Processes under the cluster whose environment names function `name` (its runtimes)."""
    found = []
    for pid in node_processes(cluster):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).environ().get("VEIL_FUNCTION") == name:
                found.append(pid)
    return found


def test_cold_start_from_zero_takes_a_prestarted_worker_and_leaves_nothing(ray_platform, cluster):  # noqa: F811
    name = "coldstart"
    ray_platform.deploy(echo_spec(name, max_instances=1, idle_timeout_s=2.0), routing=VEIL)
    try:
        assert ray_platform.invoke(name, {"x": 0}, model="m1")["echo"] == {"x": 0}
        [first] = ray_platform.replicas(name)
        seen = runtime_pids([first])
        assert wait_until(lambda: ray_platform.metrics(name)["instances"] == 0, 30), ray_platform.metrics(name)
        assert wait_until(lambda: gone(seen), 10), "a runtime process survived scale to zero"
        assert wait_until(lambda: not function_processes(cluster, name), 10), function_processes(cluster, name)

        for run in range(2):
            before = node_processes(cluster)
            t0 = time.monotonic()
            assert ray_platform.invoke(name, {"x": run + 1}, model="m1", timeout=60)["echo"] == {"x": run + 1}
            cold_ms = (time.monotonic() - t0) * 1000
            [replica] = ray_platform.replicas(name)
            print(f"cold start from zero #{run + 1}: {cold_ms:.0f} ms, worker {replica['worker_pid']}")
            # the replica's Ray worker was running before the request: no process start on the path
            assert replica["worker_pid"] in before, (replica, sorted(before))
            assert psutil.Process(replica["worker_pid"]).create_time() == before[replica["worker_pid"]]
            # its runtime is a new process of its own, tied to it as before
            assert replica["runtime_pid"] not in before and replica["runtime_pid"] not in seen
            seen |= runtime_pids([replica])
            assert wait_until(lambda: ray_platform.metrics(name)["instances"] == 0, 30), ray_platform.metrics(name)
            assert wait_until(lambda: gone(seen), 10), "a runtime process survived scale to zero"
            # what the nodes keep (idle workers, Ray's own processes) has nothing of the function
            assert wait_until(lambda: not function_processes(cluster, name), 10), function_processes(cluster, name)
    finally:
        ray_platform.remove(name)


def test_a_killed_prestarted_replica_is_replaced_and_its_runtime_dies(ray_platform, cluster):  # noqa: F811
    name = "coldkill"
    ray_platform.deploy(echo_spec(name, max_instances=1, idle_timeout_s=2.0), routing=VEIL)
    try:
        ray_platform.invoke(name, {"x": 0}, model="m1")
        [replica] = ray_platform.replicas(name)
        os.kill(replica["worker_pid"], signal.SIGKILL)
        assert wait_until(lambda: gone({replica["runtime_pid"]}), 10), "the runtime outlived its Ray worker"
        assert ray_platform.invoke(name, {"x": 1}, model="m1", timeout=60)["echo"] == {"x": 1}
        [fresh] = ray_platform.replicas(name)
        assert fresh["worker_pid"] != replica["worker_pid"] and fresh["runtime_pid"] != replica["runtime_pid"]
        assert wait_until(lambda: ray_platform.metrics(name)["instances"] == 0, 30), ray_platform.metrics(name)
        assert wait_until(lambda: gone(runtime_pids([fresh])), 10), "a runtime process survived scale to zero"
        assert wait_until(lambda: not function_processes(cluster, name), 10), function_processes(cluster, name)
    finally:
        ray_platform.remove(name)
