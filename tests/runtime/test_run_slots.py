"""Model runs at once per instance are bounded (`CoreConfig.parallel_runs`, default one per CPU
the process may use): requests beyond that wait for a slot holding only their input, so ONNX
Runtime's per-run working memory does not grow with the requests in flight. Every request is
still served, with the right answer."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from runtime_support import MODEL, reference

from veil.errors import BadRequest
from veil.runtime.core import CoreConfig, RunSlots, run_slots
from veil.runtime.tee_action import core_config


def test_default_is_one_slot_per_usable_cpu_per_intra_op_thread():
    cpus = len(os.sched_getaffinity(0))
    assert run_slots(CoreConfig()) == cpus
    assert run_slots(CoreConfig(intra_op_threads=2)) == max(1, cpus // 2)
    assert run_slots(CoreConfig(parallel_runs=3)) == 3
    assert core_config({}).parallel_runs == 0 and core_config({"parallel_runs": 2}).parallel_runs == 2
    for bad in (-1, 1.5e9, "two", True):
        with pytest.raises(BadRequest, match="init.parallel_runs"):
            core_config({"parallel_runs": bad})


@pytest.mark.parametrize("slots", [1, 2])
def test_concurrent_requests_run_at_most_slots_at_once_and_all_are_served(make_harness, trained, slots):
    h = make_harness(CoreConfig(parallel_runs=slots))
    h.publish(MODEL, 1, trained.v1)
    h.grant(MODEL, "u")
    x = {"input": trained.x}
    want = reference(trained.v1, trained.x)
    h.infer(MODEL, "u", x)  # load the model
    assert h.core.stats()["run_slots"] == slots

    # observe the real model's runs: how many are inside it at once (each lingers a little)
    model, cached = h.core.models.acquire((MODEL, 1), lambda: pytest.fail("the model should be cached"))
    h.core.models.release((MODEL, 1))
    assert cached
    inside, peak, lock = 0, 0, threading.Lock()
    real_run = model.run

    def observed(inputs):
        nonlocal inside, peak
        with lock:
            inside += 1
            peak = max(peak, inside)
        try:
            time.sleep(0.02)
            return real_run(inputs)
        finally:
            with lock:
                inside -= 1

    model.run = observed
    results, errors = [], []

    def client():
        try:
            results.append(h.infer(MODEL, "u", x))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 8
    assert all(np.array_equal(r["label"], want["label"]) for r in results)
    assert peak == slots, peak


def test_slots_admit_waiters_in_arrival_order():
    slots = RunSlots(1)
    order: list[int] = []
    with slots:  # hold the only slot while five waiters line up, one after another
        threads = []
        for i in range(5):
            t = threading.Thread(target=lambda i=i: _take(slots, order, i))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while slots._next != i + 2 and time.monotonic() < deadline:  # waiter i holds its ticket
                time.sleep(0.001)
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2, 3, 4]


def _take(slots: RunSlots, order: list, i: object) -> None:
    with slots:
        order.append(i)
        time.sleep(0.005)


def test_a_freed_slot_goes_to_the_waiter_not_to_a_newcomer():
    """The releasing thread coming straight back (it holds the GIL) does not barge past a waiter."""
    slots = RunSlots(1)
    order: list[str] = []
    slots.__enter__()
    waiter = threading.Thread(target=lambda: _take(slots, order, "waiter"))
    waiter.start()
    deadline = time.monotonic() + 5
    while slots._next != 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    slots.__exit__()
    with slots:
        order.append("newcomer")
    waiter.join(timeout=10)
    assert order == ["waiter", "newcomer"]


def test_a_waiter_past_its_deadline_leaves_the_line_and_the_next_one_still_runs():
    slots = RunSlots(1)
    order: list[str] = []
    slots.acquire()
    t0 = time.monotonic()
    assert slots.acquire(deadline=time.time() + 0.05) is False  # gave up, holds nothing
    assert 0.04 <= time.monotonic() - t0 < 2
    late = threading.Thread(target=lambda: _take(slots, order, "behind"))
    late.start()
    deadline = time.monotonic() + 5
    while slots._next != 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    slots.release()  # the turn skips the ticket that left
    late.join(timeout=5)
    assert order == ["behind"] and slots._free == 1
    assert slots.acquire(deadline=time.time() + 1) is True  # the slot is free again at once


def test_a_request_that_cannot_start_before_its_deadline_is_dropped_encrypted(make_harness, trained):
    from runtime_support import refused

    h = make_harness(CoreConfig(parallel_runs=1))
    h.publish(MODEL, 1, trained.v1)
    h.grant(MODEL, "u")
    x = {"input": trained.x}
    h.infer(MODEL, "u", x)  # load the model
    h.core._runs.acquire()  # a long run holds the only slot
    try:
        env = h.request(MODEL, "u", x)
        real_infer = h.core.infer
        h.core.infer = lambda e: real_infer(e, deadline=time.time() + 0.05)
        code, message, status = refused(h, env)
    finally:
        h.core._runs.release()
    assert (code, status) == ("deadline_exceeded", 504) and "without running" in message
    h.core.infer = real_infer
    assert np.array_equal(h.infer(MODEL, "u", x)["label"], reference(trained.v1, trained.x)["label"])
