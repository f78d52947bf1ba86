"""The Ray warm pool's pure parts (no Ray cluster): the autoscaling rule and the options a
`prewarm` spec becomes. The pool on a real cluster: tests/e2e/test_ray_pool.py."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from veil.platform import FunctionSpec
from veil.platform.protocol import Routing
from veil.platform.ray_serve import deployment_options
from veil.platform.ray_serve.autoscale import VeilPoolPolicy, pool_replicas
from veil.platform.ray_serve.models import ReplicaModels
from veil.platform.ray_serve.supervisor import RuntimeSupervisor

ECHO = [sys.executable, str(Path(__file__).with_name("echo_action.py"))]


def spec(**kw: object) -> FunctionSpec:
    return FunctionSpec(name="f", command=["true"], concurrency=4, max_instances=3, **kw)


def test_the_pool_rule_keeps_prewarm_replicas_beyond_demand():
    assert pool_replicas(0.0, 3.2, 0, 1) == 1  # idle: only the spare
    assert pool_replicas(0.5, 3.2, 1, 1) == 2  # one live replica (a model taken): one more spare
    assert pool_replicas(9.0, 3.2, 1, 2) == 5  # load wants 3 (2.8 replicas of it), plus two spares
    assert pool_replicas(6.4, 3.2, 0, 0) == 2  # no pool: what load needs
    assert pool_replicas(0.3, 3.2, 0, 1) == 1  # a trickle of control-plane calls keeps no replica


def test_the_pool_policy_counts_only_running_live_replicas():
    ctx = SimpleNamespace(
        current_num_replicas=3,
        running_replicas=["a", "b", "c"],
        aggregated_metrics={"veil_live": {"a": 1.0, "b": 0.0, "gone": 1.0}},
        total_num_requests=0.2,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: 3.2),
        policy_state={},
        deployment_name="f",
    )
    desired, state = VeilPoolPolicy(prewarm=2)(ctx)
    assert desired == 3.0 and state == {"veil_live": 1}


@pytest.mark.parametrize("routing", [Routing("veil"), None], ids=["veil-router", "serve-router"])
def test_prewarm_shifts_the_bounds_and_installs_the_pool_policy(routing):
    a = deployment_options(spec(prewarm=2, min_instances=1), routing)["autoscaling_config"]
    assert (a["min_replicas"], a["initial_replicas"], a["max_replicas"]) == (3, 3, 5)  # spares beyond max
    assert a["policy"] == {
        "policy_function": "veil.platform.ray_serve.autoscale:VeilPoolPolicy",
        "policy_kwargs": {"prewarm": 2},
    }


def test_without_prewarm_nothing_changes():
    a = deployment_options(spec(), Routing("veil"))["autoscaling_config"]
    assert (a["min_replicas"], a["initial_replicas"], a["max_replicas"]) == (0, 0, 3)
    assert a["policy"] == {"policy_function": "veil.platform.ray_serve.autoscale:veil_autoscaling_policy"}
    assert "policy" not in deployment_options(spec(), None)["autoscaling_config"]


def test_a_spare_gets_a_fresh_runtime_with_nothing_of_earlier_requests(tmp_path: Path):
    spec = FunctionSpec(name="echo", command=list(ECHO), start_timeout_s=10.0, prewarm=1)
    sup = RuntimeSupervisor(spec, replica_id="r1", log_dir=tmp_path / "logs")
    try:
        assert sup.start() is None
        first = sup.run({"model": "A"}, 10.0)["ok"]
        old = sup.stats()["runtime_pid"]
        assert sup.recycle() is None
        after = sup.stats()
        assert after["recycled"] == 1 and after["starts"] == 2 and after["runtime_pid"] != old
        assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
        again = sup.run({"model": "A"}, 10.0)["ok"]
        assert again["pid"] == after["runtime_pid"] != first["pid"]
    finally:
        sup.close()


def test_replica_models_idle_only_with_no_model_and_nothing_in_flight():
    models = ReplicaModels(5.0)
    assert models.idle()
    models.begin(None)
    assert not models.idle()  # a request without a model in flight
    models.end(None)
    models.begin("A")
    models.end("A")
    assert not models.idle() and models.evict(["A"]) == ["A"] and models.idle()
