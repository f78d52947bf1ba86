"""SeSeMI FnPacker rules, on hand-made sequences (times in seconds, injected)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from veil.packer import PoolSpec, Reject, Route, Stop
from veil.packer.policies import SeSeMIPolicy


def make(pool=4, idle=60.0):
    return SeSeMIPolicy(PoolSpec(function="pool", idle_timeout_s=idle), pool_size=pool)


def slot_of(policy, route):
    return policy.slot_instance.index(route.instance)


def test_new_models_take_lowest_free_slots_in_order():
    p = make()
    a = p.route("A", 0.0)
    b = p.route("B", 0.0)
    c = p.route("C", 0.0)
    assert [slot_of(p, r) for r in (a, b, c)] == [0, 1, 2]
    assert a.start and a.cold and a.load


def test_idle_model_takes_lowest_available_slot_not_its_previous_one():
    p = make()
    a = p.route("A", 0.0)
    b = p.route("B", 0.0)  # slot 1
    p.complete(a, 0.1, 0.1, True)  # A idle; slot 0 free and unclaimed
    p.complete(b, 0.1, 0.1, True)
    b2 = p.route("B", 10.0)
    assert slot_of(p, b2) == 0  # lowest index, not B's old slot 1
    assert b2.load and b2.evict == ("A",)  # single-model runtime: A is replaced


def test_second_in_flight_claims_the_slot_third_follows():
    p = make()
    a1 = p.route("A", 0.0)
    a2 = p.route("A", 0.01)
    a3 = p.route("A", 0.02)
    assert a1.instance == a2.instance == a3.instance
    assert p.claims[0] == "A"
    assert p.in_use["A"] == 3


def test_claim_holds_for_twice_the_exec_time_then_lapses():
    p = make(pool=2)
    a1 = p.route("A", 0.0)
    a2 = p.route("A", 0.0)  # claim slot 0
    p.complete(a1, 1.0, 0.5, True)
    p.complete(a2, 1.0, 0.5, True)  # last exec 0.5 s, last call ended at 1.0
    b = p.route("B", 1.5)  # 0.5 s idle < 2 x 0.5: slot 0 still claimed
    assert slot_of(p, b) == 1
    p.complete(b, 1.6, 0.1, True)
    c = p.route("C", 2.0)  # exactly 2 x exec idle: the claim lapsed
    assert slot_of(p, c) == 0
    assert p.claims[0] == ""  # stealing clears the claim


def test_owner_may_reuse_its_claimed_slot():
    p = make(pool=2)
    a1, a2 = p.route("A", 0.0), p.route("A", 0.0)
    p.started(a1.instance, 0.5, True)
    p.complete(a1, 1.0, 5.0, True)
    p.complete(a2, 1.0, 5.0, True)
    again = p.route("A", 1.1)
    assert slot_of(p, again) == 0 and not again.cold


def test_all_busy_is_rejected_and_does_not_count():
    p = make(pool=1)
    p.route("A", 0.0)
    r = p.route("B", 0.0)
    assert isinstance(r, Reject) and r.reason == "all busy"
    assert p.in_use["B"] == 0


def test_failed_invocation_releases_the_slot():
    p = make(pool=1)
    a = p.route("A", 0.0)
    p.complete(a, 0.2, 0.0, False)
    assert p.busy == [False] and p.in_use["A"] == 0
    b = p.route("B", 0.3)  # FnPacker would answer "all busy" forever here
    assert isinstance(b, Route) and slot_of(p, b) == 0


def test_idle_instance_stops_after_the_fixed_timeout():
    p = make(idle=5.0)
    a = p.route("A", 0.0)
    p.started(a.instance, 0.5, True)
    p.complete(a, 1.0, 0.5, True)
    assert p.tick(5.9) == []
    assert p.next_deadline() == 6.0
    assert p.tick(6.0) == [Stop(a.instance, "pool")]
    assert p.slot_instance[0] is None
    again = p.route("A", 7.0)
    assert again.start


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABCDE"), st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_an_instance_never_serves_two_models_at_once(ops):
    p = make(pool=3)
    open_routes: list[Route] = []
    now = 0.0
    for model, finish_one, ok in ops:
        now += 0.05
        if finish_one and open_routes:
            p.complete(open_routes.pop(0), now, 0.05, ok)
        r = p.route(model, now)
        if isinstance(r, Route):
            open_routes.append(r)
        for inst in p.instances.values():
            assert len(inst.inflight) <= 1
        # busy flags agree with what is in flight
        for idx, inst_id in enumerate(p.slot_instance):
            inflight = p.instances[inst_id].total_inflight if inst_id in p.instances else 0
            assert p.busy[idx] == (inflight > 0)
    for r in open_routes:
        p.complete(r, now + 1, 0.05, False)
    assert not any(p.busy) and all(v == 0 for v in p.in_use.values())
