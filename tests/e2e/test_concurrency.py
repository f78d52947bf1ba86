"""One instance, many requests: concurrent requests, two models interleaved on one instance, a
replayed envelope (alone and in concurrent copies) served once, and an instance killed under a
load of 50 concurrent requests."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from e2e_support import (
    Stack,
    assert_matches_reference,
    error_of,
    gateway_post,
    run_concurrently,
    start_stack,
    wait_until,
)

from veil.deployment import TEE_FUNCTION
from veil.errors import VeilError

LR, MLP = "breast-cancer-lr", "digits-mlp"


@pytest.fixture(scope="module")
def single(tmp_path_factory, models, secrets) -> Iterator[Stack]:
    """One instance at most, 16 request threads in it."""
    s = start_stack(tmp_path_factory.mktemp("veil-e2e-single"), models, secrets, max_instances=1, concurrency=16)
    try:
        yield s
    finally:
        s.close()


def _only_instance(stack: Stack):
    live = stack.tee_instances()
    assert len(live) == 1, [(i.id, i.state) for i in live]
    return live[0]


def test_16_concurrent_requests_on_one_instance(single):
    model = single.models[MLP]
    rows = [model.x_test[i : i + 2] for i in range(0, 32, 2)]
    assert len(rows) == 16
    results = run_concurrently([lambda x=x: single.infer(single.user, MLP, x) for x in rows], timeout=120)
    for x, (kind, value) in zip(rows, results, strict=True):
        assert kind == "ok", f"{value.code}: {value.message}" if kind == "error" else value
        assert_matches_reference(model, x, value)

    inst = _only_instance(single)
    m = single.platform.metrics(TEE_FUNCTION)
    assert m["cold_starts"] == 1 and m["peak_instances"] == 1, m
    assert m["crashes"] == 0
    stats = single.platform.invoke_instance(TEE_FUNCTION, inst.id, {"op": "stats"}, timeout=10)
    assert stats["models_cached"] == [MLP]
    assert stats["model_loads"] == 1, "concurrent misses must load the model once (single flight)"
    assert stats["key_cache_misses"] == 1 and stats["key_cache_hits"] == 15, stats


def test_two_models_interleaved_on_one_instance(single):
    lr, mlp = single.models[LR], single.models[MLP]
    work = []
    for i in range(12):
        model = lr if i % 2 == 0 else mlp
        work.append((model, model.x_test[40 + i : 43 + i]))
    before = _only_instance(single)
    results = run_concurrently([lambda m=m, x=x: single.infer(single.user, m.model_id, x) for m, x in work], 120)
    for (model, x), (kind, value) in zip(work, results, strict=True):
        assert kind == "ok", f"{value.code}: {value.message}" if kind == "error" else value
        assert_matches_reference(model, x, value)

    inst = _only_instance(single)
    assert inst.id == before.id and inst.pid == before.pid, "the one instance was replaced"
    assert inst.requests >= before.requests + len(work)
    stats = single.platform.invoke_instance(TEE_FUNCTION, inst.id, {"op": "stats"}, timeout=10)
    assert sorted(stats["models_cached"]) == sorted([LR, MLP]), stats
    assert stats["model_loads"] == 2, stats
    assert stats["key_cache_entries"] == 2, stats
    assert single.platform.metrics(TEE_FUNCTION)["cold_starts"] == 1


def test_replayed_envelope_is_served_once(single):
    """The same envelope again (the cloud replays it): refused as a replay by the instance that
    served it; concurrent copies of a fresh envelope: exactly one is served."""
    model = single.models[LR]
    x = model.x_test[:2]
    single.secrets.tensors(f"input {LR}", {"input": x})
    _, env = single.user.sealed_request(LR, {"input": x})
    path = f"/v1/models/{LR}:infer"
    first = gateway_post(single, path, env)
    assert first.status_code == 200, first.text
    again = gateway_post(single, path, env)
    assert again.status_code == 409, again.text
    assert error_of(again)["code"] == "replay"

    _, fresh = single.user.sealed_request(LR, {"input": x})
    results = run_concurrently([lambda: gateway_post(single, path, fresh) for _ in range(8)], timeout=60)
    statuses = sorted(r.status_code for kind, r in results if kind == "ok")
    assert statuses == [200] + [409] * 7, statuses
    # the user's next request (a new id) is served as usual
    assert_matches_reference(model, x, single.infer(single.user, LR, x))


def test_killed_instance_under_load(make_stack):
    """SIGKILL the only instance while 50 concurrent requests are queued or running on it."""
    stack = make_stack(max_instances=1, concurrency=4)
    model = stack.models[MLP]
    # a few hundred rows per request, so requests take long enough to be caught in flight
    x = np.ascontiguousarray(np.tile(model.x_test, (4, 1)))
    assert_matches_reference(model, x[:5], stack.infer(stack.user, MLP, x[:5]))  # warm: keys, model
    victim = _only_instance(stack)
    assert victim.pid is not None

    done = threading.Event()
    answered = []
    answered_lock = threading.Lock()

    def one(i: int):
        try:
            return stack.infer(stack.user, MLP, x[i : i + 400])
        finally:
            with answered_lock:
                answered.append(i)

    killed_when_answered = []

    def killer() -> None:
        # kill mid-load: some requests answered, the instance's slots all taken, more waiting
        def busy_now() -> bool:
            with answered_lock:
                if len(answered) < 5:
                    return False
            return any(i.inflight >= 4 for i in stack.platform.instances(TEE_FUNCTION) if i.id == victim.id)

        busy = wait_until(busy_now, timeout=60, interval=0.002)
        with answered_lock:
            killed_when_answered.append(len(answered))
        os.kill(victim.pid, signal.SIGKILL)
        killed_when_answered.append(bool(busy))
        done.set()

    k = threading.Thread(target=killer, daemon=True)
    k.start()
    t0 = time.monotonic()
    results = run_concurrently([lambda i=i: one(i) for i in range(50)], timeout=150)
    elapsed = time.monotonic() - t0
    assert done.wait(5) and killed_when_answered[1], "the instance was never seen busy"
    assert killed_when_answered[0] < 45, "the kill came after (almost) every request was answered"

    assert len(results) == 50  # every request was answered (run_concurrently bounds the wait)
    assert elapsed < 120
    ok = [(i, v) for i, (kind, v) in enumerate(results) if kind == "ok"]
    failed = [v for kind, v in results if kind == "error"]
    for i, out in ok:
        assert_matches_reference(model, x[i : i + 400], out)
    for err in failed:
        assert isinstance(err, VeilError)
        assert err.code in {"instance_crashed", "unknown_instance", "busy", "timeout", "start_failed"}, (
            err.code,
            err.message,
        )
        assert err.status in (502, 503, 504), (err.code, err.status)
        assert err.message
    assert failed, "killing the only instance under load failed no request at all"

    # the platform replaces the instance: a later request succeeds on a new process
    def served():
        try:
            return stack.infer(stack.user, MLP, x[:3])
        except VeilError:
            return None

    out = wait_until(served, timeout=60, interval=0.2)
    assert out is not None, "no request succeeded after the kill"
    assert_matches_reference(model, x[:3], out)
    new = _only_instance(stack)
    assert new.pid != victim.pid and new.id != victim.id
    m = stack.platform.metrics(TEE_FUNCTION)
    assert m["crashes"] >= 1 and m["cold_starts"] >= 2, m
