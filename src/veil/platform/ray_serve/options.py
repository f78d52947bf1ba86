"""How a `FunctionSpec` becomes Ray Serve deployment options (pure: no Ray import).

The knobs LocalPlatform honours map one to one: `concurrency` -> `max_ongoing_requests`,
`max_queue` -> `max_queued_requests` (per handle; beyond it Serve refuses with back-pressure,
which Veil reports as `busy`), `min_instances`/`max_instances` -> autoscaling bounds (min 0 =
scale to zero), `memory_mb` -> the replica's Ray memory reservation, `idle_timeout_s` -> the
keep-alive before scaling down.

Cold start from zero. Serve's handle averages its queue length over `look_back_period_s`
(default 30 s) from samples taken every `0.2 x look_back_period_s` (6 s), and pushes that
average to the controller every `metrics_interval_s` (10 s). A request that arrives at a
deployment with no replicas is pushed at once, but with the last sample, taken before it
queued: the controller sees zero demand until the next sample, which is why the first replica
was scheduled up to 6-10 s late (and why scaling to zero took 30 s longer than asked). A 0.5 s
look-back (a sample every 0.1 s), a 0.1 s push interval and no upscale delay remove that: the
controller starts the replica within about 0.2 s and the cold start is the Ray worker start
plus the runtime's own start. See docs/platform.md, "Ray".

Routers. `Routing.policy == "veil"` installs Veil's request router
(`veil.packer.ray_router.VeilRequestRouter`, the packer's Veil policy) and Veil's
autoscaling policy (`autoscale.veil_autoscaling_policy`: the replica count Serve's load rule
asks for, but never fewer than the replicas whose models are inside their learned keep-alive).
Anything else keeps Serve's default multiplex-aware power-of-two router and its default
autoscaling with the function's fixed idle timeout: the baseline.

Warm pool. `prewarm = N > 0` keeps N model-free replicas beyond demand with either router
(`autoscale.VeilPoolPolicy`): the bounds become `min_instances + N` .. `max_instances + N` (spares
do not count in `max_instances`, as on the local platform) and the first N start at deploy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from veil.platform.protocol import Routing
from veil.platform.spec import FunctionSpec

# Serve 2.60 still honours the per-deployment `metrics_interval_s` and warns that it will move to
# process-wide environment variables; Veil sets it per deployment (the cold-start fix above), so
# the warning, repeated for every config Serve builds, says nothing an operator can act on.
warnings.filterwarnings("ignore", message=r"The `metrics_interval_s` field", category=DeprecationWarning)

ROUTER_CLASS = "veil.packer.ray_router:VeilRequestRouter"
AUTOSCALING_POLICY = "veil.platform.ray_serve.autoscale:veil_autoscaling_policy"
POOL_POLICY = "veil.platform.ray_serve.autoscale:VeilPoolPolicy"


@dataclass(frozen=True)
class RayOptions:
    """Ray-specific knobs, the same for every function a RayPlatform deploys.

    - `num_cpus`: logical CPUs reserved per replica; fractional, since a replica mostly waits
      on its runtime subprocess (which Ray does not account for).
    - `metrics_interval_s`, `look_back_period_s`, `upscale_delay_s`: see the module docstring
      (cold start).
    - `veil_downscale_delay_s`: with Veil's router, how long a lower replica count must persist
      before Serve acts on it, and the shortest keep-alive the router learns for a model. A
      replica start costs about 2-3 s of latency on Ray (about 1 s locally), and keeping an
      idle replica for less time than a start takes never pays (the rent-or-buy break-even),
      so this is set near the cold start; it also stops replicas started for a burst from
      being dropped while still starting.
    - `veil_upscale_delay_s`: with Veil's router, how long a higher replica count must persist
      before Serve starts replicas (from zero replicas Serve starts one at once regardless). A
      burst that the running replicas drain within a replica start gains nothing from a new
      replica, which arrives after it, and pays its GB-s and, on a small machine, the CPU of a
      Ray worker start in the middle of the burst; the router queues such bursts on warm
      replicas (`VeilRequestRouter._wait`) and spills over to others by expected wait.
    - `health_check_period_s` / `health_check_timeout_s`: Serve's replica health checks (the
      replica restarts a dead runtime itself; the check replaces a wedged replica).
    - `resources`: custom Ray resources every replica needs, e.g. `{"tee": 0.001}` to pin
      replicas to nodes started with `--resources '{"tee": 1}'` (TEE hosts).
    - `log_dir`: where runtime logs go on each node (default: the temp dir, veil-ray-logs/).
    - `max_models_per_replica`: the default router's multiplex cache size; None = as many as
      the memory model fits (`(memory_mb - base_mb) / default_model_mb`).
    - `router_backoff_s`: the router's first and maximum retry back-off when a replica is full.
    - `grpc_transport`: send requests from the handle to replicas over Serve's direct gRPC
      channel (each replica runs that server anyway) instead of Ray actor calls through the
      object store: a few milliseconds less per request. Off: Ray's default transport.
    - `access_log`: Serve's per-request access log in each replica (off: it costs about 1 ms
      per warm request, and the platform's metrics count requests anyway).
    - `prestart_workers`: idle Ray workers each replica asks its node's raylet to start once it
      is up (`prestart_delay_s` after its constructor, so the new worker's own start does not
      compete with the cold start it follows), kept at least `prestart_keepalive_s`: the next
      replica started on that node, from zero or not, leases one instead of starting a process
      (see `workers`). 0: off (every replica start then waits for a new worker).
    """

    num_cpus: float = 0.25
    metrics_interval_s: float = 0.1
    look_back_period_s: float = 0.5
    upscale_delay_s: float = 0.0
    veil_downscale_delay_s: float = 5.0
    veil_upscale_delay_s: float = 1.0
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    graceful_shutdown_timeout_s: float = 5.0
    resources: dict[str, float] = field(default_factory=dict)
    log_dir: str | None = None
    max_models_per_replica: int | None = None
    router_backoff_s: tuple[float, float] = (0.002, 0.02)
    grpc_transport: bool = True
    access_log: bool = False
    prestart_workers: int = 1
    prestart_delay_s: float = 1.0
    prestart_keepalive_s: float = 600.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RayOptions:
        data = dict(data)
        if "router_backoff_s" in data:
            data["router_backoff_s"] = tuple(data["router_backoff_s"])
        return cls(**data)


def uses_veil_router(routing: Routing | None) -> bool:
    return routing is not None and routing.policy == "veil"


def models_per_replica(spec: FunctionSpec, routing: Routing | None, options: RayOptions) -> int:
    """The default router's multiplex cache size (Serve's LRU of model ids per replica)."""
    if options.max_models_per_replica is not None:
        return max(1, options.max_models_per_replica)
    base = routing.base_mb if routing is not None else 80.0
    each = routing.default_model_mb if routing is not None else 40.0
    return max(1, math.floor((spec.memory_mb - base) / max(1.0, each)))


def deployment_options(
    spec: FunctionSpec,
    routing: Routing | None = None,
    options: RayOptions | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """`serve.deployment(**options)` for `spec`: the same knobs LocalPlatform honours."""
    o = options or RayOptions()
    veil = uses_veil_router(routing)
    autoscaling: dict[str, Any] = {
        "min_replicas": spec.min_instances,
        "initial_replicas": spec.min_instances,
        "max_replicas": spec.max_instances,
        # scale out before replicas are full, as LocalPlatform starts one when all are busy
        "target_ongoing_requests": max(1.0, 0.8 * spec.concurrency),
        "metrics_interval_s": o.metrics_interval_s,
        "look_back_period_s": o.look_back_period_s,
        "upscale_delay_s": o.upscale_delay_s,
        "downscale_delay_s": spec.idle_timeout_s,
        "downscale_to_zero_delay_s": spec.idle_timeout_s,
    }
    if spec.prewarm:
        autoscaling["min_replicas"] = spec.min_instances + spec.prewarm
        autoscaling["initial_replicas"] = spec.min_instances + spec.prewarm
        autoscaling["max_replicas"] = spec.max_instances + spec.prewarm
    router: dict[str, Any] = {
        "initial_backoff_s": o.router_backoff_s[0],
        "max_backoff_s": o.router_backoff_s[1],
        "backoff_multiplier": 2.0,
    }
    if veil:
        assert routing is not None
        autoscaling["policy"] = {"policy_function": AUTOSCALING_POLICY}
        autoscaling["downscale_delay_s"] = min(spec.idle_timeout_s, o.veil_downscale_delay_s)
        autoscaling["downscale_to_zero_delay_s"] = min(spec.idle_timeout_s, o.veil_downscale_delay_s)
        autoscaling["upscale_delay_s"] = o.veil_upscale_delay_s
        router["request_router_class"] = ROUTER_CLASS
        router["request_router_kwargs"] = {
            "function": spec.name,
            "min_keepalive_s": min(spec.idle_timeout_s, o.veil_downscale_delay_s),
            "capacity": spec.concurrency,
            "memory_mb": float(spec.memory_mb),
            "idle_timeout_s": spec.idle_timeout_s,
            "base_mb": routing.base_mb,
            "default_model_mb": routing.default_model_mb,
            "model_mb": dict(routing.model_mb),
        }
    if spec.prewarm:  # either router: the replicas report whether they hold a model
        autoscaling["policy"] = {"policy_function": POOL_POLICY, "policy_kwargs": {"prewarm": spec.prewarm}}
    actor: dict[str, Any] = {"num_cpus": o.num_cpus, "memory": spec.memory_mb * 2**20}
    if o.resources:
        actor["resources"] = dict(o.resources)
    out: dict[str, Any] = {
        "name": spec.name,
        "max_ongoing_requests": spec.concurrency,
        # Serve needs at least one (0 is "no waiting" locally; the nearest Serve allows)
        "max_queued_requests": max(1, spec.max_queue),
        "autoscaling_config": autoscaling,
        "ray_actor_options": actor,
        "request_router_config": router,
        "health_check_period_s": o.health_check_period_s,
        "health_check_timeout_s": o.health_check_timeout_s,
        "graceful_shutdown_timeout_s": o.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.1,
        # Serve writes an access-log line per request in the replica, on the request's path
        # (about 1 ms of a warm request on this machine); Veil meters requests itself.
        "logging_config": {"enable_access_log": o.access_log},
    }
    out.update(overrides)
    return out
