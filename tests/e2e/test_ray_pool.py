"""The warm pool on a real Ray cluster (`FunctionSpec.prewarm`): the head and a second node on
loopback, as tests/e2e/test_ray_cluster.py builds them (its fixtures, reused).

With prewarm=1 a spare replica is RUNNING after deploy, its runtime started and initialised
(`/init` done in the replica's constructor) and holding no model; the first request for a
model is served by that spare, which was started before the request, with no replica start and
no `/init` on the request path; Veil's autoscaling policy then starts a new spare; the pool's
idle time is billed apart (`prewarm_gb_seconds`). Without the pool the same first request waits
for a replica start and the action's `/init`.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve")

from e2e_support import wait_until  # noqa: E402
from test_ray_cluster import VEIL, cluster, echo_spec, ray_platform  # noqa: E402, F401

pytestmark = pytest.mark.timeout(180)

#: the echo action sleeps this long in `/init`: a request that waits for a start waits for it
INIT_SLEEP_S = 1.5


def _served_by(answer: dict) -> str:
    """The replica id in the echo action's instance id (`<function>-<replica>-<n>`)."""
    return answer["env"]["VEIL_INSTANCE_ID"].rsplit("-", 1)[0].split("-", 1)[1]


def test_a_spare_serves_the_first_request_and_the_pool_refills(ray_platform):  # noqa: F811 (the fixture)
    init = {"init_sleep": INIT_SLEEP_S}
    # Without the pool: the first request waits for a replica start and /init.
    ray_platform.deploy(echo_spec("nopool", init_value=init, max_instances=1, idle_timeout_s=30.0), routing=VEIL)
    try:
        assert ray_platform.metrics("nopool")["spares_ready"] == 0
        t0 = time.monotonic()
        ray_platform.invoke("nopool", {"x": 0}, model="A", timeout=60.0)
        cold_s = time.monotonic() - t0
        m = ray_platform.metrics("nopool")
        assert m["prewarm_gb_seconds"] == 0 and m["prewarm_hits"] == 0 and m["cold_starts"] == 1, m
    finally:
        ray_platform.remove("nopool")
    assert cold_s > INIT_SLEEP_S, cold_s

    name = "pool"
    ray_platform.deploy(echo_spec(name, init_value=init, prewarm=1, max_instances=2, idle_timeout_s=30.0), routing=VEIL)
    try:
        assert wait_until(lambda: ray_platform.metrics(name)["spares_ready"] == 1, 60), ray_platform.metrics(name)
        [spare] = ray_platform.replicas(name)
        assert spare["models"] == {} and spare["runtime_pid"], spare
        before = ray_platform.metrics(name)
        assert before["ready"] == 0 and before["instances"] == 0, before
        assert before["prewarm_gb_s_per_hour"] == pytest.approx(256 / 1024 * 3600), before
        assert before["spare_starts"] == 1 and before["cold_starts"] == 0, before

        requested_at = time.time()
        t0 = time.monotonic()
        answer = ray_platform.invoke(name, {"x": 1}, model="A", timeout=60.0)
        pooled_s = time.monotonic() - t0
        # served by the spare that was running before the request: no start, no /init on its path
        assert _served_by(answer) == spare["replica_id"], (answer["env"], spare)
        assert answer["pid"] == spare["runtime_pid"]
        assert spare["started_at"] < requested_at
        assert pooled_s < INIT_SLEEP_S < cold_s, (pooled_s, cold_s)

        # the autoscaler starts a new spare; the one that took the model is now serving
        def refilled() -> bool:
            m = ray_platform.metrics(name)
            return m["ready"] == 1 and m["spares_ready"] == 1

        assert wait_until(refilled, 60), ray_platform.metrics(name)
        replicas = {r["replica_id"]: r for r in ray_platform.replicas(name)}
        assert set(replicas[spare["replica_id"]]["models"]) == {"A"}
        [fresh] = [r for rid, r in replicas.items() if rid != spare["replica_id"]]
        assert fresh["models"] == {} and fresh["started_at"] > requested_at, fresh

        after = ray_platform.metrics(name)
        assert after["prewarm_hits"] == 1 and after["spare_starts"] == 2, after
        assert after["cold_starts"] == 1 and after["cold_start_ms"]["max"] == 0.0, after  # no one waited
        assert after["instances"] == 1 and after["gb_seconds"] > 0, after
        assert after["prewarm_gb_seconds"] > before["prewarm_gb_seconds"] > 0, (before, after)
        assert after["prewarm_gb_s_per_hour"] == pytest.approx(256 / 1024 * 3600), after
        assert ray_platform.metrics()["totals"]["prewarm_gb_seconds"] >= after["prewarm_gb_seconds"]

        # a replica whose model is dropped goes back to the pool (billed as idle again), and
        # the autoscaler lets the surplus spare go: one spare stays
        ray_platform.unload(name, "A")
        assert wait_until(lambda: ray_platform.metrics(name)["ready"] == 0, 20), ray_platform.metrics(name)

        def recycled() -> dict | None:  # a fresh runtime: nothing of request A stays in the spare
            mine = [r for r in ray_platform.replicas(name) if r["replica_id"] == spare["replica_id"]]
            return mine[0] if mine and mine[0]["recycled"] == 1 and mine[0]["runtime_pid"] else None

        back = wait_until(recycled, 20, interval=0.5)
        assert back and back["runtime_pid"] != spare["runtime_pid"] and back["models"] == {}, back

        def one_spare_left() -> bool:
            m = ray_platform.metrics(name)
            return m["spares_ready"] == 1 and m["ready"] + m["starting"] + m["spares_starting"] + m["draining"] == 0

        assert wait_until(one_spare_left, 40, interval=0.5), ray_platform.metrics(name)
        assert ray_platform.metrics(name)["instances"] == 0
    finally:
        ray_platform.remove(name)
    gone = ray_platform.metrics(name)
    assert gone["prewarm_gb_s_per_hour"] == 0 and gone["spares_ready"] == 0, gone
