"""Run a Veil function on Ray Serve (clusters). Requires the optional extra: `pip install 'veil[ray]'`.

Each Serve replica owns one runtime subprocess (the same `veil.platform.instance.Instance`
LocalPlatform uses: loopback port, `/init` once, `/run` per request) and forwards requests to
it, so the runtime is identical on every platform. Ray Serve provides what LocalPlatform does
itself: autoscaling between min and max replicas (min 0 = scale to zero), per-replica
concurrency (`max_ongoing_requests`), a bounded queue (`max_queued_requests`), health checks
that replace a dead replica, and model multiplexing (requests carrying the
`serve_multiplexed_model_id` header go to a replica where that model is warm).

This module is NOT exercised by the test suite (ray is not installed in CI); only the pure
option mapping `deployment_options` is. To try it on a machine with Ray:

    pip install 'veil[ray]'
    python -c "from veil.platform.ray_serve import run; from veil.platform import FunctionSpec; \\
               import sys; h = run(FunctionSpec('veil-tee', [sys.executable, '-m', 'veil.runtime'], \\
               init_value={'kind': 'tee'})); print(h.remote({'ping': 1}).result())"
    # or, declaratively: serve run deploy/ray/serve_config.yaml
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from veil.platform.errors import PlatformError
from veil.platform.spec import FunctionSpec


def deployment_options(
    spec: FunctionSpec,
    *,
    num_cpus: float = 1.0,
    upscale_delay_s: float = 1.0,
    health_check_period_s: float = 5.0,
) -> dict[str, Any]:
    """`serve.deployment(**options)` for `spec`: the same knobs LocalPlatform honours."""
    return {
        "name": spec.name,
        "max_ongoing_requests": spec.concurrency,
        "max_queued_requests": spec.max_queue,
        "autoscaling_config": {
            "min_replicas": spec.min_instances,
            "max_replicas": spec.max_instances,
            # scale out before replicas are full, as LocalPlatform starts one when all are busy
            "target_ongoing_requests": max(1.0, 0.8 * spec.concurrency),
            "upscale_delay_s": upscale_delay_s,
            "downscale_delay_s": spec.idle_timeout_s,
            "downscale_to_zero_delay_s": spec.idle_timeout_s,
        },
        "ray_actor_options": {"num_cpus": num_cpus, "memory": spec.memory_mb * 2**20},
        "health_check_period_s": health_check_period_s,
        "graceful_shutdown_timeout_s": 20.0,
    }


def _import_serve() -> Any:
    try:
        from ray import serve
    except ImportError as e:
        raise PlatformError(
            "start_failed",
            f"the Ray platform needs Ray Serve: pip install 'veil[ray]' (import failed: {e})",
        ) from None
    return serve


def build_app(
    spec: FunctionSpec,
    *,
    max_models_per_replica: int = 8,
    log_dir: str | None = None,
    request_timeout_s: float = 60.0,
    **options: Any,
) -> Any:
    """A Ray Serve Application running `spec`'s command in every replica.

    HTTP callers get the action's `{"error": ...}` with its status; handle callers get the
    ActionError raised. A replica whose runtime process died fails its health check and is
    replaced by Serve."""
    serve = _import_serve()
    from starlette.requests import Request

    from veil.platform.dispatch import encode_activation
    from veil.platform.instance import Instance

    spec.validate()
    spec_json = json.dumps(_spec_dict(spec))

    @serve.deployment(**deployment_options(spec, **options))
    class VeilReplica:
        """One Serve replica = one runtime subprocess on a loopback port."""

        def __init__(self, spec_json: str) -> None:
            import os
            import uuid

            self.spec = FunctionSpec(**json.loads(spec_json))
            rid = f"{self.spec.name}-ray-{uuid.uuid4().hex[:8]}"
            ns = self.spec.namespace
            env = {
                **os.environ,
                **self.spec.env,
                "__OW_ACTION_NAME": f"/{ns}/{self.spec.name}",
                "__OW_NAMESPACE": ns,
                "__OW_API_HOST": "ray",
                "VEIL_FUNCTION": self.spec.name,
                "VEIL_INSTANCE_ID": rid,
            }
            self.instance = Instance(
                instance_id=rid,
                function=self.spec.name,
                command=self.spec.command,
                env=env,
                memory_mb=self.spec.memory_mb,
                concurrency=self.spec.concurrency,
                generation=0,
                log_path=Path(log_dir or tempfile.gettempdir()) / "veil-ray-logs" / f"{rid}.log",
            )
            self.instance.spawn()
            self.instance.initialize(self.spec.init_value, time.monotonic() + self.spec.start_timeout_s)

        @serve.multiplexed(max_num_models_per_replica=max_models_per_replica)
        async def get_model(self, model_id: str) -> str:
            # Routing affinity only: the runtime keeps its own model cache.
            return model_id

        async def __call__(self, request: Request | dict) -> Any:
            import asyncio

            from starlette.responses import JSONResponse

            from veil.platform.errors import ActionError

            is_http = not isinstance(request, dict)
            value = await request.json() if is_http else request
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.get_model(model_id)
            deadline = time.monotonic() + request_timeout_s
            body = encode_activation(self.spec, value, deadline)
            try:
                return await asyncio.to_thread(self.instance.run, body, request_timeout_s)
            except ActionError as e:
                if is_http:
                    return JSONResponse({"error": e.body}, status_code=e.status)
                raise

        def check_health(self) -> None:
            code = self.instance.exit_code()
            if code is not None:
                raise RuntimeError(f"runtime process exited with code {code}")

        def __del__(self) -> None:
            self.instance.terminate()

    return VeilReplica.bind(spec_json)


def run(spec: FunctionSpec, *, route_prefix: str | None = None, **kw: Any) -> Any:
    """Deploy on the connected Ray cluster (or a local one) and return a DeploymentHandle."""
    serve = _import_serve()
    return serve.run(build_app(spec, **kw), name=spec.name, route_prefix=route_prefix or f"/{spec.name}")


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` configs (see deploy/ray)."""
    spec_fields = {k: v for k, v in args.items() if k in FunctionSpec.__dataclass_fields__}
    spec = FunctionSpec(**spec_fields)
    return build_app(spec)


def _spec_dict(spec: FunctionSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in FunctionSpec.__dataclass_fields__}
