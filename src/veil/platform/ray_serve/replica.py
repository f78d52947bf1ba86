"""The Ray Serve deployment that runs Veil's runtime: one replica = one runtime subprocess.

Each replica starts its runtime in its constructor (so Serve routes to it only once `/init`
answered; the cold start is the replica's creation in a Ray worker plus the runtime's own
start), forwards each request to it, and answers with a `wire` dict. The worker is normally one
the node prestarted, with this module preloaded (`workers`): a deploy asks every node for one,
and each replica, once up, asks its node for the next. What the replica adds to the runtime:

- model multiplexing by model id (`handle.options(multiplexed_model_id=...)`): with Serve's
  default router, `serve.multiplexed` keeps an LRU of model ids per replica that Serve's
  router prefers (evicting one sends the runtime its unload request, when it has one); with
  Veil's router, the router decides evictions and keep-alive and sends them with the request
  (`veil={"evict": [...], "keepalive_s": w}`), and the replica reports to Serve's autoscaler
  whether it still holds a model inside its window (`record_autoscaling_stats`);
- `stats` and `unload` for `handle.broadcast` (tests, operators, `Platform.unload`), and
  `residency` (whether the replica holds a model, since when): with a warm pool
  (`FunctionSpec.prewarm`) a replica holding no model is a spare, billed as the pool's idle
  cost, and one that holds a model is serving;
- a health check that replaces a runtime that died while idle.

Errors never leave as exceptions (see `wire`), so no Ray traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from ray import serve

from veil.platform.errors import PlatformError
from veil.platform.protocol import Routing
from veil.platform.ray_serve import wire
from veil.platform.ray_serve.models import ReplicaModels
from veil.platform.ray_serve.options import RayOptions, deployment_options, models_per_replica, uses_veil_router
from veil.platform.ray_serve.supervisor import RuntimeSupervisor
from veil.platform.ray_serve.workers import prestart, seed_nodes
from veil.platform.spec import FunctionSpec

log = logging.getLogger("veil.platform.ray_serve.replica")


class _Slot:
    """A model id in Serve's multiplex LRU; evicting it unloads the model from the runtime."""

    def __init__(self, replica: VeilReplica, model: str) -> None:
        self.replica = replica
        self.model = model
        self._done = False

    def __del__(self) -> None:  # called by Serve's LRU on eviction (and by GC: hence the flag)
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            self.replica.models.evict([self.model])
            self.replica.note_residency()
            self.replica.unload_runtime(self.model)


class VeilReplica:
    """One Serve replica of a Veil function."""

    def __init__(self, spec: dict[str, Any], routing: dict[str, Any] | None, options: dict[str, Any]) -> None:
        self.spec = FunctionSpec(**spec)
        self.routing = Routing.from_json(routing) if routing is not None else None
        self.options = RayOptions.from_json(options)
        self.veil = uses_veil_router(self.routing)
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.started_at = time.time()
        log_root = Path(self.options.log_dir or Path(tempfile.gettempdir()) / "veil-ray-logs")
        self.supervisor = RuntimeSupervisor(
            self.spec, replica_id=f"{self.spec.name}-{self.replica_id}", log_dir=log_root / self.spec.name
        )
        self.models = ReplicaModels(self.spec.idle_timeout_s)
        # whether a model is resident, and since when (wall clock): a spare holds none
        self._holding, self._holding_since = False, self.started_at
        self._aclient: aiohttp.ClientSession | None = None
        # Unloads and health checks block (requests themselves are awaited on the loop).
        self._pool = ThreadPoolExecutor(max_workers=self.spec.concurrency + 2, thread_name_prefix="veil-replica")
        if not self.veil:
            limit = models_per_replica(self.spec, self.routing, self.options)

            async def _veil_multiplexed_load(model_id: str) -> _Slot:
                return _Slot(self, model_id)  # the runtime loads the model on its first request

            self._load_model = serve.multiplexed(max_num_models_per_replica=limit)(_veil_multiplexed_load)
        # The constructor waits for the runtime's /init: Serve routes to a replica only once it
        # is RUNNING, so a routable replica is one whose runtime can serve (a router that saw a
        # "ready" replica still starting would place requests behind a cold start). A failed
        # start is reported to requests (start_failed, with back-off), never by failing the
        # constructor, which Serve would only retry in a loop.
        error = self.supervisor.start()
        if error is not None:
            log.warning("replica %s has no runtime yet: %s", self.replica_id, error.message)
        # This replica took a Ray worker (a prestarted one, or one started for it): ask the node
        # for a fresh idle one, so the next replica here starts without a new process.
        if self.options.prestart_workers > 0:
            timer = threading.Timer(
                self.options.prestart_delay_s,
                prestart,
                args=(self.options.prestart_workers,),
                kwargs={"keep_alive_s": self.options.prestart_keepalive_s},
            )
            timer.daemon = True
            timer.start()

    async def __call__(self, value: Any, veil: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """`value`: the JSON object's encoding (what the Ray platform sends) or the object."""
        if not isinstance(value, (bytes, dict)):
            return wire.error(
                PlatformError("bad_request", f"function {self.spec.name!r}: value must be a JSON object", status=400)
            )
        model = serve.get_multiplexed_model_id() or None
        loop = asyncio.get_running_loop()
        hints = veil or {}
        if self.veil:
            for gone in self.models.evict(hints.get("evict") or ()):
                await loop.run_in_executor(self._pool, self.unload_runtime, gone)
        elif model:
            await self._load_model(model)
        self.models.begin(model, hints.get("keepalive_s"))
        self.note_residency()
        try:
            return await self.supervisor.run_async(self._client(), value, float(timeout))
        finally:
            self.models.end(model)

    def _client(self) -> aiohttp.ClientSession:
        """One keep-alive pool to the runtime, on the loop the replica's requests run on
        (created on first use: a session belongs to the loop it was made on)."""
        if self._aclient is None:
            self._aclient = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.spec.concurrency + 2, keepalive_timeout=30.0),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._aclient

    def unload_runtime(self, model: str) -> bool:
        """Send the runtime the routing's unload request for `model` (False if it has none)."""
        body = self.routing.unload_request(model) if self.routing is not None else None
        if body is None:
            return False
        answer = self.supervisor.run(body, 10.0)
        return "ok" in answer

    async def unload(self, model: str) -> bool:
        """`Platform.unload`, broadcast to every replica."""
        dropped = self.models.evict([model])
        self.note_residency()
        if not dropped:
            return False
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.unload_runtime, model)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every sampling interval. With Veil's router: drop models whose
        keep-alive ended and say whether this replica is still live (see `autoscale`)."""
        if not self.veil and not self.spec.prewarm:
            return {}
        if self.veil:  # (Serve's default router keeps its own LRU: nothing expires here)
            loop = asyncio.get_running_loop()
            for model in self.models.expire():
                await loop.run_in_executor(self._pool, self.unload_runtime, model)
            self.note_residency()
        return {"veil_live": 1.0 if self.models.live() else 0.0}

    def note_residency(self) -> None:
        """Record when the replica went from holding no model to holding one, or back. With a
        warm pool, a replica whose last model left becomes a spare: its runtime is replaced by a
        fresh one in the background (`RuntimeSupervisor.recycle`), so no model or key of earlier
        requests stays in a spare."""
        holding = bool(self.models.resident())
        if holding != self._holding:
            self._holding, self._holding_since = holding, time.time()
            if not holding and self.spec.prewarm:
                self._pool.submit(self._recycle)

    def _recycle(self) -> None:
        if not self.models.idle():  # a request came in meanwhile: it is serving again
            return
        error = self.supervisor.recycle()
        if error is not None:
            log.warning("replica %s: the fresh runtime of a spare failed to start: %s", self.replica_id, error.message)

    async def residency(self) -> dict[str, Any]:
        """For the platform's pool billing (`handle.broadcast`): cheap, no runtime call."""
        self.note_residency()
        return {"replica_id": self.replica_id, "holding": self._holding, "since": self._holding_since}

    async def check_health(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.supervisor.check)

    async def stats(self) -> dict[str, Any]:
        import ray

        return {
            "replica_id": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "worker_pid": os.getpid(),
            "started_at": self.started_at,
            "router": "veil" if self.veil else "ray",
            "models": self.models.snapshot(),
            **self.supervisor.stats(),
        }

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.supervisor.close()
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=False, cancel_futures=True)


def spec_json(spec: FunctionSpec) -> dict[str, Any]:
    """The spec as the replicas get it. Instance bounds and the queue are the autoscaler's and
    the handle's business, so they are left out: changing them (`Platform.scale`) is then a
    light update of the running replicas, not a replacement."""
    out = {k: getattr(spec, k) for k in FunctionSpec.__dataclass_fields__}
    out.update(min_instances=0, max_instances=1, max_queue=0)
    return out


def build_app(
    spec: FunctionSpec,
    routing: Routing | None = None,
    options: RayOptions | None = None,
    **overrides: Any,
) -> Any:
    """A Serve Application running `spec`'s command in every replica."""
    spec.validate()
    o = options or RayOptions()
    seed_nodes(o.prestart_workers, keep_alive_s=o.prestart_keepalive_s)  # (once per node and process)
    deployment = serve.deployment(**deployment_options(spec, routing, o, **overrides))(VeilReplica)
    return deployment.bind(spec_json(spec), routing.to_json() if routing is not None else None, o.to_json())
