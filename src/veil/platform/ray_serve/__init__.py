"""Veil on Ray Serve (clusters). Requires the optional extra: `pip install 'veil[ray]'`.

- `RayPlatform` (`platform.py`): the `Platform` protocol on Ray Serve.
- `replica.py`: the deployment; each replica owns one runtime subprocess (`supervisor.py`),
  bound to loopback and tied to the replica's life.
- `veil.packer.ray_router`: Veil's packing policy as a Serve request router (it lives in the
  packer and is named here by import path only); `autoscale.py`: the policy's keep-alive as a
  Serve autoscaling policy; `models.py`: per-replica model residency.
- `options.py`: FunctionSpec -> Serve options (pure); `wire.py`: what crosses the handle.
- `cluster.py`: start a local multi-node Ray cluster on loopback (tests, benchmarks, demos).

This package imports Ray only when a Ray-backed object is used, so `deployment_options` and
the error for a missing extra work without it.
"""

from __future__ import annotations

from typing import Any

from veil.platform.errors import PlatformError
from veil.platform.protocol import Routing
from veil.platform.ray_serve.options import RayOptions, deployment_options
from veil.platform.spec import FunctionSpec

__all__ = ["RayOptions", "RayPlatform", "app_builder", "build_app", "deployment_options", "run"]


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise PlatformError(
            "start_failed",
            f"the Ray platform needs Ray Serve: pip install 'veil[ray]' (import failed: {e})",
        ) from None


def build_app(
    spec: FunctionSpec, routing: Routing | None = None, options: RayOptions | None = None, **overrides: Any
) -> Any:
    """A Serve Application running `spec`'s command in every replica (see replica.py)."""
    _require_ray()
    from veil.platform.ray_serve.replica import build_app as _build

    return _build(spec, routing, options, **overrides)


def run(spec: FunctionSpec, routing: Routing | None = None, options: RayOptions | None = None) -> Any:
    """Deploy on the connected Ray cluster and return the application's DeploymentHandle."""
    _require_ray()
    from ray import serve

    return serve.run(build_app(spec, routing, options), name=spec.name, route_prefix=None)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` / `serve deploy` configs (deploy/ray): `args` are
    FunctionSpec fields, plus optional `routing` (a `Routing` as JSON) and `ray` (`RayOptions`)."""
    spec = FunctionSpec(**{k: v for k, v in args.items() if k in FunctionSpec.__dataclass_fields__})
    routing = Routing.from_json(args["routing"]) if args.get("routing") else None
    options = RayOptions.from_json(args["ray"]) if args.get("ray") else None
    return build_app(spec, routing, options)


def __getattr__(name: str) -> Any:
    if name == "RayPlatform":
        _require_ray()
        from veil.platform.ray_serve.platform import RayPlatform

        return RayPlatform
    raise AttributeError(name)
