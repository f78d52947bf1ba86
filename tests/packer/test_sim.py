import numpy as np
from sim import Costs, simulate
from tracegen import TraceConfig, generate

from veil.packer import PoolSpec, make_policy

COSTS = Costs(start_s=0.5, default_load_s=0.1, default_warm_s=0.01, base_mb=50.0)


def spec(**kw):
    base = dict(function="pool", capacity=2, memory_mb=256.0, base_mb=50.0, idle_timeout_s=10.0)
    base.update(kw)
    return PoolSpec(**base)


def test_hand_made_sequence_latencies():
    times = np.array([0.0, 0.1, 5.0])
    res = simulate(make_policy("veil", spec()), times, ["A", "A", "A"], COSTS, end=6.0)
    lat = [round(r.latency_s, 3) for r in res.requests]
    # first: start 0.5 + load 0.1 + 0.01; second waits for the start and the load; third warm
    assert lat == [0.61, 0.51, 0.01]
    assert [r.cold for r in res.requests] == [True, True, False]
    assert len(res.spans) == 1 and res.spans[0].stopped == 6.0


def test_capacity_queues_and_scale_out():
    times = np.zeros(4)
    res = simulate(make_policy("per-model", spec(capacity=2)), times, ["A"] * 4, COSTS, end=2.0)
    assert len(res.spans) == 2  # capacity 2 per instance
    assert res.summary()["max_instances"] == 2


def test_deterministic_and_packing_beats_per_model():
    tr = generate(TraceConfig(n_models=8, duration_s=300, total_rate=3.0, seed=5))
    out = {}
    for name in ("per-model", "sesemi", "veil"):
        opts = {"pool_size": 8} if name == "sesemi" else {}
        a = simulate(make_policy(name, spec(), **opts), tr.times, tr.models, COSTS, seed=1, end=300).summary()
        b = simulate(make_policy(name, spec(), **opts), tr.times, tr.models, COSTS, seed=1, end=300).summary()
        assert a == b
        assert a["requests"] == len(tr) and a["failed"] == 0
        out[name] = a
    assert out["veil"]["gb_s"] < out["per-model"]["gb_s"]
    assert out["veil"]["cold_start_fraction"] < out["sesemi"]["cold_start_fraction"]
