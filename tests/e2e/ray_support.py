"""A real local Ray cluster for one test module (head and a second node on 127.0.0.x, dashboard
off) and a RayPlatform on it: the fixtures' shared body, so each module still gets its own."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from veil.platform import FunctionSpec
from veil.platform.ray_serve import RayOptions
from veil.platform.ray_serve.cluster import LocalRayCluster
from veil.platform.ray_serve.platform import RayPlatform

#: The echo action (tests/platform/echo_action.py): answers with its value, env and pid.
ECHO = [sys.executable, str(Path(__file__).resolve().parents[1] / "platform" / "echo_action.py")]


def echo_spec(name: str = "echo", **kw: object) -> FunctionSpec:
    """The echo action as a small function (two slots, two replicas, short idle timeout)."""
    base: dict = dict(concurrency=2, max_instances=2, idle_timeout_s=2.0, start_timeout_s=15.0, memory_mb=256)
    base.update(kw)
    return FunctionSpec(name=name, command=list(ECHO), **base)


@contextmanager
def local_cluster(prefix: str) -> Iterator[LocalRayCluster]:
    root = Path(tempfile.mkdtemp(prefix=prefix))  # short: Ray's socket paths must fit 107 bytes
    c = LocalRayCluster(root, workers=1, num_cpus=2)
    saved: dict[str, str | None] = {}
    try:
        c.start()
        saved = c.connect_here()
        yield c
    finally:
        c.stop()
        c.restore_env(saved)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def platform_on(cluster: LocalRayCluster) -> Iterator[RayPlatform]:
    p = RayPlatform(
        address=cluster.address,
        node_ip=cluster.head_ip,
        options=RayOptions(num_cpus=0.25, log_dir=str(cluster.root / "runtime-logs")),
    )
    try:
        yield p
    finally:
        p.close()
