"""Model versions: the cache is keyed by (model, version), the runtime opens exactly the version
and digest the release names, serves a new version once the release names it, drops the old one,
and refuses a rolled-back, substituted or tampered sealed file as model_integrity."""

from __future__ import annotations

import io
import threading

import numpy as np
from runtime_support import MODEL, reference, refused

from veil.crypto import chunked
from veil.runtime.caches import ModelCache


def _labels(out: dict[str, np.ndarray]) -> np.ndarray:
    return out["label"]


def test_a_new_version_is_served_once_the_key_cache_entry_expires(harness, trained, clock):
    x = {"input": trained.x}
    want_v1, want_v2 = reference(trained.v1, trained.x)["label"], reference(trained.v2, trained.x)["label"]
    assert (want_v1 != want_v2).all()  # the versions are told apart by every prediction
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "u", ttl_s=30)
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "u", x)), want_v1)

    harness.publish(MODEL, 2, trained.v2)  # the KeyService now releases version 2
    clock.advance(29)
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "u", x)), want_v1)  # cached keys: still v1
    clock.advance(2)
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "u", x)), want_v2)
    stats = harness.core.stats()
    assert stats["model_versions_cached"] == [[MODEL, 2]], stats  # v1 left memory
    assert stats["models_cached"] == [MODEL]
    assert stats["model_loads"] == 2


def test_a_newer_version_seen_for_one_user_refreshes_the_others(harness, trained, clock):
    """Two users' keys cached at v1; once one release names v2, the other user's cached v1
    release is refreshed too rather than keeping v1 loaded beside v2."""
    x = {"input": trained.x}
    harness.publish(MODEL, 1, trained.v1)
    harness.grant(MODEL, "a", ttl_s=5)
    harness.grant(MODEL, "b", ttl_s=300)
    harness.infer(MODEL, "a", x)
    harness.infer(MODEL, "b", x)
    harness.publish(MODEL, 2, trained.v2)
    clock.advance(6)
    want_v2 = reference(trained.v2, trained.x)["label"]
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "a", x)), want_v2)
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "b", x)), want_v2)
    assert harness.releases.count(MODEL, "b") == 2
    assert harness.core.stats()["model_versions_cached"] == [[MODEL, 2]]


def test_an_older_sealed_file_at_the_current_path_is_refused(harness, trained):
    """Rollback: the store serves yesterday's file (version 1, sealed under the same model key)
    where version 2 belongs. Refused as model_integrity naming rollback, never cached."""
    key = harness.publish(MODEL, 1, trained.v1)
    old = harness.store.path(MODEL, 1).read_bytes()
    harness.publish(MODEL, 2, trained.v2, key=key)
    good = harness.store.path(MODEL, 2).read_bytes()
    harness.store.path(MODEL, 2).write_bytes(old)
    harness.grant(MODEL, "u")
    x = {"input": trained.x}
    for _ in range(2):  # refused, and not half-cached: refused again
        code, message, status = refused(harness, harness.request(MODEL, "u", x))
        assert (code, status) == ("model_integrity", 403)
        assert "rollback" in message and "version" in message and MODEL in message, message
        assert harness.core.stats()["models_cached"] == []
    harness.store.path(MODEL, 2).write_bytes(good)
    np.testing.assert_array_equal(_labels(harness.infer(MODEL, "u", x)), reference(trained.v2, trained.x)["label"])


def test_another_file_under_the_same_version_number_is_refused(harness, trained):
    """Substitution: a file sealed by the owner's key as version 2 but with other content than
    the digest the KeyService released."""
    key = harness.publish(MODEL, 2, trained.v2)
    other = chunked.seal_bytes(key, trained.v1, model=MODEL, version=2)
    harness.store.put(MODEL, 2, io.BytesIO(other))
    harness.grant(MODEL, "u")
    code, message, _ = refused(harness, harness.request(MODEL, "u", {"input": trained.x}))
    assert code == "model_integrity" and "digest" in message and "substitution" in message, message


def test_a_tampered_sealed_file_is_refused_as_tampering(harness, trained):
    harness.publish(MODEL, 1, trained.v1)
    path = harness.store.path(MODEL, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    harness.grant(MODEL, "u")
    code, message, status = refused(harness, harness.request(MODEL, "u", {"input": trained.x}))
    assert (code, status) == ("model_integrity", 403)
    assert "tampering" in message and "rollback" not in message, message
    assert harness.core.stats()["models_cached"] == []


def test_a_missing_version_is_a_clear_error(harness, trained):
    harness.publish(MODEL, 1, trained.v1)
    harness.store.delete(MODEL, 1)
    harness.grant(MODEL, "u")
    code, message, status = refused(harness, harness.request(MODEL, "u", {"input": trained.x}))
    assert (code, status) == ("unknown_model", 404) and "version 1" in message, message


def test_model_cache_drops_a_superseded_version_when_its_last_request_ends():
    cache = ModelCache(1 << 30, family=lambda key: key[0])
    cache.acquire(("m", 1), lambda: ("v1", 10))  # a request in flight on v1
    assert cache.acquire(("other", 1), lambda: ("o", 10)) == ("o", False)
    cache.release(("other", 1))
    assert cache.acquire(("m", 2), lambda: ("v2", 10)) == ("v2", False)
    assert ("m", 1) in cache.cached_models()  # still in use: kept
    cache.release(("m", 2))
    cache.release(("m", 1))
    assert cache.cached_models() == [("other", 1), ("m", 2)]
    # an idle old version goes at once
    cache.acquire(("m", 3), lambda: ("v3", 10))
    assert cache.cached_models() == [("other", 1), ("m", 3)]
    cache.release(("m", 3))


def test_model_cache_single_flight_per_version():
    cache = ModelCache(1 << 30, family=lambda key: key[0])
    loads = []
    gate = threading.Event()

    def load():
        loads.append(1)
        gate.wait(5)
        return "v", 1

    threads = [threading.Thread(target=lambda: cache.acquire(("m", 1), load)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert len(loads) == 1
