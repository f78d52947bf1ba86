"""Veil policy: warm first, least loaded with room, LRU eviction, learned keep-alive."""

from hypothesis import given, settings
from hypothesis import strategies as st

from veil.packer import KeepAliveLearner, PoolSpec, Reject, Route, Stop, Unload
from veil.packer.policies import VeilPolicy


def make(memory=300.0, base=100.0, sizes=None, cap=2, max_instances=4, keepalive=None):
    spec = PoolSpec(
        function="pool",
        capacity=cap,
        memory_mb=memory,
        base_mb=base,
        max_instances=max_instances,
        idle_timeout_s=60.0,
        model_mb=sizes or {},
        default_model_mb=50.0,
    )
    return VeilPolicy(spec, keepalive=keepalive)


def ready(p, route, now=0.5):
    p.started(route.instance, now, True)


def test_warm_instance_wins_over_a_less_loaded_one():
    p = make(memory=200.0)  # base 100 + two models of 50
    a = p.route("A", 0.0)
    ready(p, a)
    b = p.route("B", 0.0)
    assert b.instance == a.instance  # room on the same instance
    c = p.route("C", 0.1)  # A and B in flight fill the memory: scale out
    assert c.start and c.instance != a.instance
    ready(p, c, 0.6)
    p.complete(b, 1.0, 0.01, True)
    p.complete(c, 1.0, 0.01, True)
    # first instance has A in flight, second is idle; B is warm only on the first
    again = p.route("B", 2.0)
    assert again.instance == a.instance and not again.cold
    assert p.instances[a.instance].total_inflight == 2


def test_short_queue_on_warm_instance_beats_a_cold_start():
    p = make(cap=1)
    a = p.route("A", 0.0)
    ready(p, a)
    p.complete(a, 0.1, 0.01, True)  # warm exec estimate: 10 ms
    busy = p.route("A", 1.0)
    queued = p.route("A", 1.0)  # full instance, but 10 ms queue < cold load + start
    assert queued.instance == busy.instance and not queued.start


def test_least_loaded_instance_with_room_then_scale_out():
    p = make(memory=250.0, cap=4)  # base 100 + 3 models of 50
    first = [p.route(m, 0.0) for m in "ABC"]
    ready(p, first[0])
    assert len({r.instance for r in first}) == 1
    d = p.route("D", 1.0)  # no room on the first (all in flight): scale out
    assert d.start and d.instance != first[0].instance


def test_evicts_least_recently_used_idle_model():
    p = make(memory=250.0, cap=4)
    rs = [p.route(m, t) for m, t in (("A", 0.0), ("B", 0.1), ("C", 0.2))]
    ready(p, rs[0])
    for r, t in zip(rs, (1.0, 1.1, 1.2), strict=True):
        p.complete(r, t, 0.01, True)
    p.complete(p.route("A", 2.0), 2.1, 0.01, True)  # A used again: B is now the LRU
    d = p.route("D", 3.0)
    assert d.instance == rs[0].instance and d.evict == ("B",)
    assert list(p.instances[d.instance].resident) == ["C", "A", "D"]


def test_never_evicts_a_model_with_requests_in_flight():
    p = make(memory=200.0, cap=4)  # base 100 + 2 models
    a = p.route("A", 0.0)
    b = p.route("B", 0.0)
    ready(p, a)
    p.complete(b, 1.0, 0.01, True)  # B idle, A still in flight
    c = p.route("C", 2.0)
    assert c.instance == a.instance and c.evict == ("B",)
    d = p.route("D", 3.0)  # only A (busy) and C (busy) resident: cannot fit here
    assert d.instance != a.instance and d.start


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABCDEFG"), st.integers(0, 3), st.booleans()), min_size=1, max_size=80))
def test_random_sequences_never_evict_busy_models_nor_overfill(ops):
    sizes = {m: 30.0 + 10 * i for i, m in enumerate("ABCDEFG")}
    p = make(memory=260.0, base=60.0, sizes=sizes, cap=3, max_instances=3)
    open_routes: list[Route] = []
    now = 0.0
    for model, finishes, ok in ops:
        now += 0.1
        for _ in range(min(finishes, len(open_routes))):
            p.complete(open_routes.pop(0), now, 0.05, ok)
        for inst in list(p.instances.values()):
            if not inst.ready:
                p.started(inst.id, now, True)
        before = {i.id: dict(i.inflight) for i in p.instances.values()}
        r = p.route(model, now)
        if isinstance(r, Reject):
            continue
        for victim in r.evict:
            assert before.get(r.instance, {}).get(victim, 0) == 0
        open_routes.append(r)
        for inst in p.instances.values():
            used = 60.0 + sum(sizes[m] for m in inst.resident)
            assert used <= 260.0
            for m, n in inst.inflight.items():
                assert n > 0 and m in inst.resident
        p.tick(now)
    for r in open_routes:
        p.complete(r, now + 1, 0.05, False)
    assert all(i.total_inflight == 0 for i in p.instances.values())


def test_learned_keep_alive_unloads_then_stops():
    ka = KeepAliveLearner(60.0, bin_s=0.5, bins=240, min_samples=5, min_s=0.5)
    p = make(keepalive=ka)
    now = 0.0
    first = None
    for _ in range(12):  # A every 2 s: window ~ 2.2 s, not the 60 s default
        r = p.route("A", now)
        first = first or r
        if r.start:
            ready(p, r, now + 0.1)
        p.complete(r, now + 0.2, 0.01, True)
        now += 2.0
    assert 2.0 <= ka.keepalive("A") <= 3.0  # one 0.5 s bin above the gap, plus 10 %
    last_use = now - 2.0 + 0.2
    deadline = p.next_deadline()
    assert abs(deadline - (last_use + ka.keepalive("A"))) < 1e-9
    assert p.tick(deadline - 0.01) == []
    assert p.tick(deadline) == [Unload(first.instance, "pool", "A"), Stop(first.instance, "pool")]
    assert p.instances == {}


def test_unknown_pattern_falls_back_to_default_keep_alive():
    ka = KeepAliveLearner(60.0)
    ka.observe("A", 0.0)
    ka.observe("A", 1.0)
    w = ka.window("A")
    assert not w.representative and w.keepalive_s == 60.0


def test_failure_releases_and_forgets_a_failed_first_load():
    p = make()
    a = p.route("A", 0.0)
    ready(p, a)
    p.complete(a, 0.5, 0.0, False)
    inst = p.instances[a.instance]
    assert inst.total_inflight == 0 and "A" not in inst.resident
