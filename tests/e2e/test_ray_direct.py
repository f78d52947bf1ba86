"""The Ray platform's direct path (`veil.platform.ray_serve.direct`) on a real Ray cluster (head
127.0.0.2 and a node 127.0.0.3, token authentication, fractional CPUs), with the echo action.

Checks: warm requests go straight to the replica that holds their model (Veil's router still
places them: each model stays on one replica) while the first request of a model takes the
handle; Serve's autoscaler sees requests in flight on the direct path (it adds a replica for
them); a replica whose worker is killed under a direct request is replaced and the request is
retried once through the handle and answers; with `direct_path=False` nothing goes direct.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("ray.serve")

import ray_support  # noqa: E402
from e2e_support import wait_until  # noqa: E402
from ray_support import local_cluster, platform_on  # noqa: E402

from veil.platform import FunctionSpec  # noqa: E402
from veil.platform.protocol import Routing  # noqa: E402
from veil.platform.ray_serve import RayOptions  # noqa: E402
from veil.platform.ray_serve.cluster import LocalRayCluster  # noqa: E402
from veil.platform.ray_serve.platform import RayPlatform  # noqa: E402

VEIL = Routing("veil")

pytestmark = pytest.mark.timeout(240)


def echo_spec(name: str, **kw: object) -> FunctionSpec:
    """The shared echo function, kept for 30 s (the direct path serves warm replicas)."""
    return ray_support.echo_spec(name, **{"idle_timeout_s": 30.0, **kw})


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with local_cluster("vrd-") as c:
        yield c


@pytest.fixture(scope="module")
def ray_platform(cluster: LocalRayCluster) -> Iterator[RayPlatform]:
    with platform_on(cluster) as p:
        yield p


def replica_of(answer: dict) -> str:
    return answer["env"]["VEIL_INSTANCE_ID"].rsplit("-", 1)[0]  # <function>-<replica>-<n>


def test_warm_requests_go_direct_to_the_replica_holding_the_model(ray_platform):
    name = "direct-affinity"
    ray_platform.deploy(echo_spec(name, min_instances=2, max_instances=2), routing=VEIL)
    try:
        assert wait_until(lambda: ray_platform.metrics(name)["ready"] == 2, 60), "two replicas did not start"
        first = {m: replica_of(ray_platform.invoke(name, {"m": m}, model=m)) for m in "ABC"}
        # the first request of each model was a load: it took the handle
        assert ray_platform.metrics(name)["direct_requests"] == 0
        rounds = [{m: replica_of(ray_platform.invoke(name, {"m": m}, model=m)) for m in "ABC"} for _ in range(5)]
        m = ray_platform.metrics(name)
        assert m["direct_requests"] == 15, m  # every warm request went straight to its replica
        for model in "ABC":
            assert {r[model] for r in rounds} == {first[model]}, (model, first, rounds)
        held = {x: {r["replica_id"] for r in ray_platform.replicas(name) if x in r["models"]} for x in "ABC"}
        assert all(len(h) == 1 for h in held.values()), held
        assert {first[x] for x in "ABC"} <= {f"{name}-{next(iter(h))}" for h in held.values()}
        # a request without a model id is placed by load, through the handle
        ray_platform.invoke(name, {"plain": 1})
        assert ray_platform.metrics(name)["direct_requests"] == 15
    finally:
        ray_platform.remove(name)


def test_the_autoscaler_sees_requests_in_flight_on_the_direct_path(ray_platform):
    name = "direct-scale"
    ray_platform.deploy(echo_spec(name, min_instances=1, max_instances=2), routing=VEIL)
    try:
        assert wait_until(lambda: ray_platform.metrics(name)["ready"] == 1, 60)
        ray_platform.invoke(name, {"warm": 1}, model="A")
        before = ray_platform.metrics(name)["direct_requests"]
        stop = time.monotonic() + 20.0
        scaled = threading.Event()

        def load() -> None:  # two slow requests in flight at all times: both slots of the replica
            while time.monotonic() < stop and not scaled.is_set():
                ray_platform.invoke(name, {"sleep": 0.5}, model="A", timeout=30)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            # 2 in flight against a target of 1.6 per replica: Serve must ask for a second one,
            # which it only can if the direct requests are in the handle's metrics
            ok = wait_until(lambda: ray_platform.metrics(name)["instances"] >= 2, 20)
            scaled.set()
        finally:
            scaled.set()
            for t in threads:
                t.join(timeout=30)
        m = ray_platform.metrics(name)
        assert m["direct_requests"] > before, m
        assert ok, f"the autoscaler did not add a replica for the direct requests in flight: {m}"
    finally:
        ray_platform.remove(name)


def test_a_replica_killed_under_a_direct_request_is_replaced_and_the_request_retried(ray_platform):
    name = "direct-heal"
    ray_platform.deploy(echo_spec(name, max_instances=1), routing=VEIL)
    try:
        ray_platform.invoke(name, {"x": 0}, model="m1")  # a load: through the handle
        ray_platform.invoke(name, {"x": 1}, model="m1")  # warm: direct
        assert ray_platform.metrics(name)["direct_requests"] == 1
        [replica] = ray_platform.replicas(name)
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(out=ray_platform.invoke(name, {"sleep": 1.0}, model="m1", timeout=90))
        )
        thread.start()
        time.sleep(0.4)
        os.kill(replica["worker_pid"], signal.SIGKILL)
        thread.join(timeout=90)
        assert result.get("out", {}).get("echo") == {"sleep": 1.0}, result
        m = ray_platform.metrics(name)
        assert m["direct_replica_gone"] == 1 and m["retries"] == 1, m
        [fresh] = ray_platform.replicas(name)
        assert fresh["worker_pid"] != replica["worker_pid"]
        # the new replica holds the model now: warm requests go direct again
        assert wait_until(lambda: ray_platform.invoke(name, {"y": 1}, model="m1") is not None, 10)
        assert wait_until(
            lambda: (
                (ray_platform.invoke(name, {"y": 2}, model="m1"), ray_platform.metrics(name)["direct_requests"])[1]
                > m["direct_requests"]
            ),
            15,
        )
    finally:
        ray_platform.remove(name)


def test_without_the_direct_path_every_request_takes_the_handle(cluster):
    p = RayPlatform(
        address=cluster.address,
        node_ip=cluster.head_ip,
        options=RayOptions(num_cpus=0.25, log_dir=str(cluster.root / "runtime-logs")),
        direct_path=False,
        app_prefix="nodirect-",
    )
    try:
        p.deploy(echo_spec("plain", max_instances=1), routing=VEIL)
        answers = [p.invoke("plain", {"i": i}, model="m1") for i in range(5)]
        assert len({replica_of(a) for a in answers}) == 1
        assert p.metrics("plain")["direct_requests"] == 0
    finally:
        p.close()
