"""End-to-end fixtures: real Veil deployments on this machine.

Everything is real: the KeyService subprocess (SQLite), runtime instances as subprocesses of the
local platform speaking the OpenWhisk protocol, the gateway (uvicorn) on loopback, ONNX Runtime.

- `stack` (session): the shared default deployment, with the demo models published by its owner
  under model keys the tests know (so the leak scan can look for them), granted to its user.
- `make_stack(**StackOptions)`: a dedicated deployment for tests that need special options (short
  key-cache TTL, one instance, a KeyService that goes away); stopped at the test's end.
- `secrets`: a session-wide record of every secret the tests handled (keys, plaintext inputs and
  outputs, model bytes), looked for in every deployment's files by test_zz_leak_scan.py.

Every wait is bounded: HTTP clients have timeouts, polling loops have deadlines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2e_support import Model, Secrets, Stack, start_stack


@pytest.fixture(scope="session")
def demo_models() -> list[Model]:
    from veil.demo_models import train_demo_models

    return [Model(m.model_id, m.onnx, m.x_test, m.y_test) for m in train_demo_models(seed=0)]


@pytest.fixture(scope="session")
def models(demo_models: list[Model]) -> dict[str, Model]:
    return {m.model_id: m for m in demo_models}


@pytest.fixture(scope="session")
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Model], secrets: Secrets) -> Iterator[Stack]:
    """The shared deployment (default options, no HE function)."""
    s = start_stack(tmp_path_factory.mktemp("veil-e2e"), models, secrets)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def make_stack(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Model], secrets: Secrets
) -> Iterator[Callable[..., Stack]]:
    """`make_stack(**StackOptions)`: a dedicated deployment, stopped when the test ends."""
    started: list[Stack] = []

    def make(**options: Any) -> Stack:
        s = start_stack(tmp_path_factory.mktemp("veil-e2e-own"), models, secrets, **options)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()
