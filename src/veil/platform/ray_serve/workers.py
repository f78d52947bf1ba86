"""Ray workers ready before a replica needs one: preloaded imports and prestarted idle workers.

A Serve replica is an actor, and an actor gets a Ray worker process of its own. Started from zero
replicas, that used to be a new process per replica: the interpreter and `import ray` (about 0.6 s
on this 2-core machine), then, at actor creation, Serve's replica module and Veil's (1.0 s), and
only then the replica's constructor. Measured with an echo deployment from zero: 1.6-2.5 s with a
new worker, 0.4-0.75 s with a prestarted worker that has preloaded both modules. Two Ray settings
give that:

- `RAY_preload_python_modules` (a raylet setting, so in the environment of `ray start`): every
  worker imports these modules before it takes work (`PRELOAD_MODULES`: Serve's replica and
  Veil's, whose import pulls in aiohttp, httpx and the platform code). A worker started for a
  lease does this on the cold path anyway; an idle worker has done it already.
- prestarted workers: the raylet keeps a worker that was started ahead of any lease, idle, and
  leases it to the next actor creation that fits (same language, no job or the same job, the
  same runtime_env, no dynamic options; Veil sets no runtime_env on replicas, so every replica
  fits). Ray prestarts a node's CPU count of workers for the first driver only, on the head;
  nothing replaces a worker an actor took. So each replica, once up, asks its own raylet for
  `count` fresh ones (`prestart`, Ray's `PrestartWorkers` RPC, job unset so that any job's
  replica can take it; `keep_alive_s`: the raylet does not reap it as idle before then), and the
  next cold start on that node leases one that is already running.

A worker that never took a lease holds nothing of any function: no spec, no runtime subprocess,
no key (only imported code), and it is Ray's: `ray stop` / `LocalRayCluster.stop` end it like
any other worker. Scale to zero therefore still leaves no Veil process behind.

`PrestartWorkers` is a raylet RPC without a Python API (Ray 2.60): `prestart` returns False and
logs once, instead of raising, if this Ray has none, so a replica never fails over it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("veil.platform.ray_serve.workers")

#: What every Ray worker imports before it takes work (see the module docstring).
PRELOAD_MODULES = ("ray.serve._private.replica", "veil.platform.ray_serve.replica")
PRELOAD_ENV = "RAY_preload_python_modules"

_warned = threading.Event()


def node_env() -> dict[str, str]:
    """The environment a Ray node needs for fast replica starts (`ray start`'s environment)."""
    return {PRELOAD_ENV: ",".join(PRELOAD_MODULES)}


def _raylet_address(node_id: str) -> str | None:
    import ray

    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive"):
            return f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    return None


def prestart(count: int = 1, *, keep_alive_s: float = 600.0, node_id: str | None = None) -> bool:
    """Ask the raylet of `node_id` (default: this worker's node) to start `count` idle Python
    workers now, kept at least `keep_alive_s`. Needs a Ray connection (a replica has one).
    Returns whether the raylet accepted; never raises."""
    if count <= 0:
        return False
    try:
        import ray

        if not ray.is_initialized():  # (ray.nodes() would start a local cluster of its own)
            raise RuntimeError("this process is not connected to Ray")
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

        node = node_id or ray.get_runtime_context().get_node_id()
        address = _raylet_address(node)
        if address is None:
            raise LookupError(f"node {node} is not alive in the cluster's node table")
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, keep_alive_duration_secs=max(0, int(keep_alive_s)), num_workers=int(count)
        )
        channel: Any = init_grpc_channel(address)
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10.0)
        finally:
            channel.close()
    except Exception as e:  # an internal Ray RPC: a Ray without it only loses the speed-up
        if not _warned.is_set():
            _warned.set()
            log.warning("could not prestart Ray workers (cold starts will start a new worker): %s", e)
        return False
    return True


_seeded: set[str] = set()
_seed_lock = threading.Lock()


def seed_nodes(count: int = 1, *, keep_alive_s: float = 600.0) -> int:
    """Prestart `count` workers on every alive node this process has not seeded yet (a deploy
    calls it): replicas replace the worker they take, but the first replica on a node would
    otherwise find none. Once per node per process, so repeated deploys (`scale`) add nothing.
    Returns how many nodes were asked; 0 without a Ray connection."""
    try:
        import ray

        if count <= 0 or not ray.is_initialized():
            return 0
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - no cluster to ask: nothing to seed
        return 0
    asked = 0
    for node in nodes:
        with _seed_lock:
            if node in _seeded:
                continue
            _seeded.add(node)
        asked += prestart(count, keep_alive_s=keep_alive_s, node_id=node)
    return asked
