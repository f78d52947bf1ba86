"""Fixtures of the runtime-core tests (helpers and stand-ins in runtime_support.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from runtime_support import Clock, Harness, Releases, TrainedModels, train_models

from veil.runtime.core import CoreConfig, RuntimeCore
from veil.store import LocalModelStore


@pytest.fixture(scope="session")
def trained() -> TrainedModels:
    return train_models()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_harness(tmp_path: Path, clock: Clock) -> Callable[..., Harness]:
    """`make(config=None) -> Harness`: a fresh core on its own store, sharing the test's clock."""
    count = iter(range(1000))

    def make(config: CoreConfig | None = None) -> Harness:
        root = tmp_path / f"store{next(count)}"
        store = LocalModelStore(root, create=True)
        releases = Releases()
        core = RuntimeCore(config or CoreConfig(), releases, store, clock=clock, monotonic=clock)
        return Harness(root, clock, releases, store, core)

    return make


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()
