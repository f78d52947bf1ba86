from veil.packer import PoolSpec, Stop
from veil.packer.policies import PerModelPolicy


def make(cap=2, max_instances=2, idle=10.0):
    return PerModelPolicy(PoolSpec(function="tpl", capacity=cap, max_instances=max_instances, idle_timeout_s=idle))


def test_one_function_per_model_named_from_the_template():
    p = make()
    a = p.route("A", 0.0)
    b = p.route("B", 0.0)
    assert a.function == "tpl--A" and b.function == "tpl--B"
    assert a.instance != b.instance and a.start and b.start


def test_reuse_then_scale_out_at_capacity_then_queue_at_max():
    p = make(cap=2, max_instances=2)
    r = [p.route("A", 0.0) for _ in range(5)]
    assert r[0].instance == r[1].instance  # capacity 2
    assert r[2].start and r[2].instance != r[0].instance
    assert r[3].instance == r[2].instance
    assert not r[4].start  # at max_instances: queue on the least loaded
    assert {x.instance for x in r} == {r[0].instance, r[2].instance}


def test_fixed_keep_alive():
    p = make(idle=10.0)
    a = p.route("A", 0.0)
    p.started(a.instance, 1.0, True)
    p.complete(a, 2.0, 1.0, True)
    warm = p.route("A", 5.0)
    assert not warm.cold
    p.complete(warm, 5.1, 0.1, True)
    assert p.tick(15.0) == []
    assert p.tick(15.1) == [Stop(a.instance, "tpl--A")]


def test_failure_releases():
    p = make(cap=1, max_instances=1)
    a = p.route("A", 0.0)
    p.started(a.instance, 0.1, True)
    p.complete(a, 0.2, 0.1, False)
    assert p.instances[a.instance].total_inflight == 0
