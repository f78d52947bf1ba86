"""The packer plans with real model sizes and routes around instances that are gone.

Sizes (`veil.packer.sizes`): a model is planned at its sealed size (from the store) times the
resident/sealed ratio until it has been measured, then at the resident growth measured on the
instance; models whose planned sum exceeds an instance's memory are never put together. Health:
a request aimed at an instance that was killed (SIGSTOPped past a deadline) before the request
reached it is placed again, on a new instance, instead of failing.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from veil.packer import Packer
from veil.packer.sizes import ModelSizes, store_sealed_mb
from veil.platform import FunctionSpec, LocalPlatform, PlatformError
from veil.store import LocalModelStore

ECHO = [sys.executable, str(Path(__file__).parents[1] / "platform" / "echo_action.py")]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_sizes_sealed_then_measured_and_the_ratio_learned_on_large_models() -> None:
    sealed = {"big": 400.0, "small": 1.0, "other": 300.0}
    clock = Clock()
    sizes = ModelSizes(sealed.get, clock=clock)
    assert sizes.lookup("big") == pytest.approx(520.0)  # 400 x the prior ratio 1.3
    assert sizes.lookup("unknown") is None  # the store does not know it: the pool's default applies
    sizes.lookup("small")
    sizes.measured("small", 30.0)  # a runtime's arenas dwarf a 1 MB model: not a ratio to learn
    assert sizes.ratio == pytest.approx(1.3) and sizes.planned("small") == 30.0
    sizes.measured("big", 800.0)  # measured: 2x its sealed size
    assert sizes.planned("big") == 800.0
    assert sizes.lookup("other") == pytest.approx(600.0)  # unmeasured models follow the learned ratio
    sizes.measured("big", -5.0)  # noise (a shrinking resident set) changes nothing
    assert sizes.planned("big") == 800.0


def test_sealed_sizes_come_from_the_store(tmp_path: Path) -> None:
    store = LocalModelStore(tmp_path / "store", create=True)
    store.put("m", 1, io.BytesIO(b"x" * (3 << 20)))
    store.put("m", 2, io.BytesIO(b"x" * (5 << 20)))
    sealed = store_sealed_mb(str(tmp_path / "store"))
    assert sealed("m") == pytest.approx(5.0)  # the newest version
    assert sealed("absent") is None


def test_models_too_big_together_are_never_co_located(tmp_path: Path) -> None:
    """Three models of 500 MB sealed on 1 GiB instances: each gets an instance of its own (the
    real runtime with three 400 MB models: bench/colocation.py, tests/runtime)."""
    with LocalPlatform(log_dir=tmp_path / "logs", reap_interval_s=0.05) as platform:
        template = FunctionSpec("pool", list(ECHO), memory_mb=1024, concurrency=4, max_instances=4)
        sealed = {"a": 500.0, "b": 500.0, "c": 500.0}.get
        with Packer(platform, template, model_size_mb=sealed) as packer:
            pids = {m: packer.invoke(m, {"model": m, "load_s": 0.3}, timeout=20)["pid"] for m in "abc"}
            for m in "cab":  # again, in another order: still apart, still warm
                assert packer.invoke(m, {"model": m, "load_s": 0.3}, timeout=20)["pid"] == pids[m]
            assert len(set(pids.values())) == 3
            for inst in packer.policy.instances.values():
                assert len(inst.resident) == 1
    # the same three with the flat 40 MB guess would have shared one instance
    with (
        LocalPlatform(log_dir=tmp_path / "logs2", reap_interval_s=0.05) as platform,
        Packer(platform, template, model_size_mb=False) as packer,
    ):
        shared = {packer.invoke(m, {"model": m, "load_s": 0.3}, timeout=20)["pid"] for m in "abc"}
        assert len(shared) == 1


def test_request_for_a_killed_instance_is_placed_again(tmp_path: Path) -> None:
    with LocalPlatform(log_dir=tmp_path / "logs", reap_interval_s=0.05) as platform:
        template = FunctionSpec("pool", list(ECHO), memory_mb=256, concurrency=2, max_instances=3)
        with Packer(platform, template, model_size_mb=False) as packer:
            first = packer.invoke("m", {}, timeout=10)["pid"]
            os.kill(first, signal.SIGSTOP)
            try:
                with pytest.raises(PlatformError) as ei:
                    packer.invoke("m", {}, timeout=1.0)
                assert ei.value.code == "timeout"
                deadline = time.monotonic() + 10
                while platform.metrics("pool")["unresponsive_killed"] == 0:
                    assert time.monotonic() < deadline, platform.metrics("pool")
                    time.sleep(0.05)
                # the policy still thinks the model is warm there; the platform refuses it
                # before sending, so the packer forgets that instance and starts another
                again = packer.invoke("m", {}, timeout=10)
                assert again["pid"] != first
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(first, signal.SIGCONT)
