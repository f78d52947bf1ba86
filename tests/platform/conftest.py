from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from veil.platform.local import FunctionSpec, LocalPlatform

ECHO = [sys.executable, str(Path(__file__).with_name("echo_action.py"))]


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[LocalPlatform]:
    p = LocalPlatform(log_dir=tmp_path / "logs", reap_interval_s=0.05)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def echo_spec() -> Callable[..., FunctionSpec]:
    def make(name: str = "echo", **kw: object) -> FunctionSpec:
        kw.setdefault("start_timeout_s", 10.0)
        return FunctionSpec(name=name, command=list(ECHO), **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def wait_until() -> Callable[..., bool]:
    return _wait_until


def _wait_until(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()
