"""The revocation delay is obeyed from each release: a key-cache entry lives for the `ttl_s` of
the release that filled it, never longer than the measured cap, and nothing in /init can
lengthen it."""

from __future__ import annotations

import time

import pytest
from runtime_support import MODEL, Harness, Releases

from veil.errors import VeilError
from veil.keyservice import wire
from veil.runtime import tensors
from veil.runtime.caches import KeyCache
from veil.runtime.core import CoreConfig
from veil.runtime.tee_action import core_config, core_from_init
from veil.store import LocalModelStore


def test_each_entry_lives_for_its_own_release_ttl(harness, trained, clock):
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "short", ttl_s=5)
    harness.grant(MODEL, "long", ttl_s=50)
    x = {"input": trained.x}
    for user in ("short", "long"):
        harness.infer(MODEL, user, x)
    clock.advance(4.9)
    for user in ("short", "long"):
        harness.infer(MODEL, user, x)
    assert (harness.releases.count(MODEL, "short"), harness.releases.count(MODEL, "long")) == (1, 1)
    clock.advance(0.2)  # 5.1 s: the short entry is gone, the long one is not
    for user in ("short", "long"):
        harness.infer(MODEL, user, x)
    assert (harness.releases.count(MODEL, "short"), harness.releases.count(MODEL, "long")) == (2, 1)
    clock.advance(45)  # 50.1 s
    harness.infer(MODEL, "long", x)
    assert harness.releases.count(MODEL, "long") == 2


def test_a_revoked_user_is_refused_once_the_release_ttl_passes(harness, trained, clock):
    harness.publish(MODEL, 1, trained.v1)
    key = harness.grant(MODEL, "u", ttl_s=10)
    harness.infer(MODEL, "u", {"input": trained.x})
    del harness.releases.users[(MODEL, "u")]  # revoked at the KeyService
    clock.advance(9)  # within the delay the release that was given still serves
    env = harness.request(MODEL, "u", {"input": trained.x}, key=key)
    assert "envelope" in harness.core.infer(env)
    clock.advance(2)
    with pytest.raises(VeilError) as info:
        harness.core.infer(harness.request(MODEL, "u", {"input": trained.x}, key=key))
    assert info.value.code == "not_granted"


def test_ttl_zero_is_not_cached(harness, trained):
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "u", ttl_s=0)
    for _ in range(3):
        harness.infer(MODEL, "u", {"input": trained.x})
    assert harness.releases.count(MODEL, "u") == 3
    assert harness.core.stats()["key_cache_entries"] == 0


def test_a_ttl_beyond_the_measured_cap_is_capped(harness, trained, clock):
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "u", ttl_s=100_000)
    harness.infer(MODEL, "u", {"input": trained.x})
    clock.advance(wire.MAX_REVOCATION_DELAY_S - 1)
    harness.infer(MODEL, "u", {"input": trained.x})
    assert harness.releases.count(MODEL, "u") == 1
    clock.advance(2)
    harness.infer(MODEL, "u", {"input": trained.x})
    assert harness.releases.count(MODEL, "u") == 2


def test_key_cache_caps_and_refuses_to_cache_nonsense_lifetimes():
    now = [0.0]
    cache: KeyCache[str] = KeyCache(300, clock=lambda: now[0])
    assert cache.get("a", lambda: ("A", 10_000))[1] is False
    now[0] = 299.9
    assert cache.get("a", lambda: ("A2", 10))[0] == "A"
    now[0] = 300.0
    assert cache.get("a", lambda: ("A3", 10)) == ("A3", False)
    for ttl in (0, -5, float("nan"), float("-inf")):
        assert cache.get(("b", ttl), lambda t=ttl: ("B", t)) == ("B", False)
        assert cache.get(("b", ttl), lambda t=ttl: ("B2", t)) == ("B2", False)


def test_init_cannot_lengthen_the_revocation_delay(tmp_path, trained):
    """An init value still carrying key_cache_ttl_s (3600, or garbage) is ignored: with real
    clocks, a 1 s release lifetime makes the next request after 1 s release the keys again."""
    assert "key_cache_ttl_s" not in CoreConfig.__dataclass_fields__
    assert core_config({"key_cache_ttl_s": "soon"}) == CoreConfig()
    store = LocalModelStore(tmp_path / "store", create=True)
    releases = Releases()
    core = core_from_init({"store": str(store.root), "key_cache_ttl_s": 3600}, releases)

    h = Harness(store.root, time.time, releases, store, core)  # type: ignore[arg-type]
    h.publish(MODEL, 1, trained.v1)
    h.grant(MODEL, "u", ttl_s=1)
    h.infer(MODEL, "u", {"input": trained.x})
    h.infer(MODEL, "u", {"input": trained.x})
    assert releases.count(MODEL, "u") == 1
    time.sleep(1.1)
    out = h.infer(MODEL, "u", {"input": trained.x})
    assert releases.count(MODEL, "u") == 2
    assert set(out) == {"label", "probabilities"}
    assert tensors.decode(tensors.encode(out)).keys() == out.keys()
