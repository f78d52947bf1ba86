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


def veil_autoscaling_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """`AutoscalingConfig.policy.policy_function`: see the module docstring."""
    live_metric = (ctx.aggregated_metrics or {}).get("veil_live", {}) if ctx.current_num_replicas else {}
    running = set(ctx.running_replicas)
    live = sum(1 for rid, value in live_metric.items() if rid in running and value > 0)
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
