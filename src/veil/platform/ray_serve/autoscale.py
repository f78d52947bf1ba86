"""Veil's keep-alive as a Ray Serve autoscaling policy (runs in Serve's controller).

Serve's default policy sizes a deployment from load alone (ongoing requests / target per
replica) and scales down once the lower size has persisted for `downscale_delay_s`: a fixed
keep-alive, the platform default the packer's baselines also get. Veil's packer instead keeps
an instance as long as one of its models is expected back soon (the per-model window learned
from inter-arrival times) and lets it go as soon as none is.

Replicas running under Veil's router report `veil_live` (1 while serving or holding a model
inside its window, see `models.ReplicaModels`); this policy asks for what load needs, but never
fewer replicas than are live. Serve's wrapper then applies the bounds, the cold-start fast path
and the (short) delays. Which replica Serve stops is Serve's choice (the newest first); Veil's
router breaks ties towards older replicas, so the newest ones are the first to go idle.

The warm pool (`FunctionSpec.prewarm = N`): `VeilPoolPolicy` asks for N replicas beyond what
load and the live replicas need, so N replicas that hold no model (started, runtime imported,
measured and attested at its `/init`, no model and no key) stay free for the next model no
replica holds. When one takes a model it becomes live and the policy asks for one more, which
Serve starts in the background (after `veil_upscale_delay_s`); with N = 0 nothing changes (the
function scales to zero with `veil_autoscaling_policy`). The deployment's bounds are shifted by
N (options.py), so spares never count in `max_instances`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

# Serve's controller logs (the policy runs there): `serve/controller_*.log` in the Ray session.
log = logging.getLogger("ray.serve")


def desired_replicas(total_requests: float, target_per_replica: float, live_replicas: int, current: int) -> float:
    """Pure rule: replicas for the load (as Serve's default), but at least the live ones."""
    if current == 0 and total_requests <= 0:
        return 0.0
    for_load = total_requests / max(target_per_replica, 1e-9)
    return max(for_load, float(live_replicas))


def pool_replicas(total_requests: float, target_per_replica: float, live_replicas: int, prewarm: int) -> int:
    """Pure rule with a warm pool: what load or the live replicas need, plus `prewarm` spares.

    A replica serving a request is live already, so load matters here only beyond the live
    replicas, and less than half a replica's target of it is left to the spares: Serve counts
    control-plane calls (the platform's residency and stats broadcasts) as ongoing requests,
    and rounding that trickle up kept a surplus spare forever."""
    for_load = total_requests / max(target_per_replica, 1e-9)
    return max(math.ceil(for_load - 0.5), live_replicas, 0) + max(0, prewarm)


def _live(ctx: Any) -> tuple[int, set[Any]]:
    live_metric = (ctx.aggregated_metrics or {}).get("veil_live", {}) if ctx.current_num_replicas else {}
    running = set(ctx.running_replicas)
    return sum(1 for rid, value in live_metric.items() if rid in running and value > 0), running


def veil_autoscaling_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """`AutoscalingConfig.policy.policy_function`: see the module docstring."""
    live, running = _live(ctx)
    desired = desired_replicas(
        ctx.total_num_requests, ctx.config.get_target_ongoing_requests(), live, ctx.current_num_replicas
    )
    if ctx.current_num_replicas == 0 and desired > 0:
        desired = math.ceil(desired)
    if live != ctx.policy_state.get("veil_live"):
        log.info(
            "Veil keep-alive: %d of %d running replicas of %s hold a model inside its window",
            live,
            len(running),
            ctx.deployment_name,
        )
    return desired, {"veil_live": live}


class VeilPoolPolicy:
    """`AutoscalingConfig.policy` for a function with a warm pool (Serve instantiates it once
    per deployment with `policy_kwargs={"prewarm": N}`): see the module docstring."""

    def __init__(self, prewarm: int = 0) -> None:
        self.prewarm = int(prewarm)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        live, running = _live(ctx)
        desired = pool_replicas(ctx.total_num_requests, ctx.config.get_target_ongoing_requests(), live, self.prewarm)
        if live != ctx.policy_state.get("veil_live"):
            log.info(
                "Veil warm pool: %d of %d running replicas of %s are live; asking for %d (%d spare)",
                live,
                len(running),
                ctx.deployment_name,
                desired,
                self.prewarm,
            )
        return float(desired), {"veil_live": live}
