"""The envelope's validity window: an expired envelope, one whose `expires` is too far ahead, and
a request id already accepted within its window are refused; forged envelopes never enter the
replay record; the record is bounded and thread-safe."""

from __future__ import annotations

import threading

import pytest
from runtime_support import MODEL, refused

from veil.crypto.encoding import b64d, b64e
from veil.crypto.envelope import CLOCK_SKEW_S, MAX_LIFETIME_S, new_request_id
from veil.crypto.keys import SymmetricKey
from veil.errors import Busy, VeilError
from veil.runtime.caches import ReplayCache
from veil.runtime.core import CoreConfig


@pytest.fixture
def ready(harness, trained):
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "u", ttl_s=300)
    return harness


def test_a_replayed_envelope_is_refused(ready, trained):
    env = ready.request(MODEL, "u", {"input": trained.x})
    assert "envelope" in ready.core.infer(env)
    code, message, status = refused(ready, env)
    assert (code, status) == ("replay", 409) and "request id" in message
    # a fresh request of the same user is served
    assert "envelope" in ready.core.infer(ready.request(MODEL, "u", {"input": trained.x}))


def test_a_replay_is_refused_until_the_window_ends(ready, trained, clock):
    env = ready.request(MODEL, "u", {"input": trained.x}, expires=int(clock()) + 30)
    ready.core.infer(env)
    clock.advance(30 + CLOCK_SKEW_S)  # the last instant of the window (expires + skew)
    assert refused(ready, env)[0] == "replay"
    clock.advance(1)  # past it: the record may go, the envelope is expired anyway
    with pytest.raises(VeilError) as info:
        ready.core.infer(env)
    assert info.value.code == "expired"
    assert ready.core.stats()["replay_window_entries"] == 0


def test_an_expired_envelope_is_refused_in_clear(ready, trained, clock):
    env = ready.request(MODEL, "u", {"input": trained.x}, expires=int(clock()) - CLOCK_SKEW_S - 1)
    with pytest.raises(VeilError) as info:
        ready.core.infer(env)
    assert (info.value.code, info.value.status) == ("expired", 400)
    assert not hasattr(info.value, "envelope")
    assert ready.releases.calls == [], "an expired envelope must not cost a key release"
    # within the tolerated clock skew it is still accepted
    ok = ready.request(MODEL, "u", {"input": trained.x}, expires=int(clock()) - CLOCK_SKEW_S + 1)
    assert "envelope" in ready.core.infer(ok)


def test_an_envelope_expiring_too_far_ahead_is_refused_naming_expires(ready, trained, clock):
    far = int(clock()) + MAX_LIFETIME_S + CLOCK_SKEW_S + 1
    with pytest.raises(VeilError) as info:
        ready.core.infer(ready.request(MODEL, "u", {"input": trained.x}, expires=far))
    assert (info.value.code, info.value.status) == ("malformed", 400)
    assert info.value.message.startswith("expires")
    edge = int(clock()) + MAX_LIFETIME_S + CLOCK_SKEW_S
    assert "envelope" in ready.core.infer(ready.request(MODEL, "u", {"input": trained.x}, expires=edge))


def test_a_forged_envelope_does_not_burn_the_request_id(ready, trained):
    """An attacker who saw (or guessed) a request id sends a forged envelope first: refused as an
    integrity failure, and the user's real envelope with that id is still served."""
    rid = new_request_id()
    real = ready.request(MODEL, "u", {"input": trained.x}, request_id=rid)
    forged = ready.request(MODEL, "u", {"input": trained.x}, request_id=rid, key=SymmetricKey.generate())
    ct = bytearray(b64d(real["ct"]))
    ct[15] ^= 0x40
    tampered = {**real, "ct": b64e(bytes(ct))}
    for bad in (forged, tampered):
        with pytest.raises(VeilError) as info:
            ready.core.infer(bad)
        assert info.value.code == "integrity"
    assert ready.core.stats()["replay_window_entries"] == 0
    assert "envelope" in ready.core.infer(real)


def test_the_same_request_id_of_another_user_is_not_a_replay(ready, trained):
    ready.grant(MODEL, "other", ttl_s=300)
    rid = new_request_id()
    ready.core.infer(ready.request(MODEL, "u", {"input": trained.x}, request_id=rid))
    assert "envelope" in ready.core.infer(ready.request(MODEL, "other", {"input": trained.x}, request_id=rid))


def test_concurrent_copies_of_one_envelope_are_served_once(ready, trained):
    env = ready.request(MODEL, "u", {"input": trained.x})
    ready.core.infer(ready.request(MODEL, "u", {"input": trained.x}))  # warm: keys and model
    results: list[str] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait(5)
        try:
            ready.core.infer(env)
            results.append("ok")
        except VeilError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["ok"] + ["replay"] * 7


def test_a_full_replay_record_refuses_with_busy(make_harness, trained, clock):
    h = make_harness(CoreConfig(replay_capacity=3))
    h.publish(MODEL, 1, trained.v1)
    h.grant(MODEL, "u", ttl_s=300)
    for _ in range(3):
        h.core.infer(h.request(MODEL, "u", {"input": trained.x}, expires=int(clock()) + 10))
    code, message, status = refused(h, h.request(MODEL, "u", {"input": trained.x}))
    assert (code, status) == ("busy", 503) and "replay window" in message
    clock.advance(10 + CLOCK_SKEW_S + 1)  # the three windows ended: their records are dropped
    assert "envelope" in h.core.infer(h.request(MODEL, "u", {"input": trained.x}))


def test_replay_cache_drops_entries_at_their_expiry_and_is_bounded():
    now = [100.0]
    cache = ReplayCache(2, clock=lambda: now[0])
    assert cache.add("a", 110) and cache.add("b", 120)
    assert not cache.add("a", 110)
    with pytest.raises(Busy):
        cache.add("c", 130)
    now[0] = 110.5
    assert len(cache) == 1
    assert cache.add("c", 130) and not cache.add("b", 120)
    now[0] = 131
    assert len(cache) == 0 and cache.add("a", 140)
