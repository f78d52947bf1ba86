"""The one interface the gateway and the packer use to run functions: `Platform`.

Every platform (local subprocesses, Ray Serve) deploys a function (`FunctionSpec`: the command
of one instance, memory, per-instance concurrency, min/max instances, idle timeout, queue),
invokes it, scales its bounds, unloads a model from its instances, and reports metrics. Callers
above `veil.platform` hold a `Platform` and never ask which concrete class it is.

Where requests are placed differs, and is part of the protocol rather than a type test:

- `routes_models = False` (local): the platform schedules requests over its instances without
  knowing models; a packer that wants model affinity places them itself through the
  `InstanceControl` methods (start, invoke on, stop an instance, per-instance keep-alive).
- `routes_models = True` (ray): the platform places requests by model id itself, running the
  packing policy named in `Routing` inside its own request router (Ray Serve's router lives in
  the caller's handle, next to the replicas' state); a packer hands it the model with each
  invoke and the routing description at deploy time.

A platform that declares `binary_envelopes = True` (local) also takes the value `{"envelope":
<bytes>}`, a binary envelope (`veil.crypto.envelope`), and sends it to the runtime as it is,
answering `{"envelope": <bytes>}`; the gateway gives every other platform (Ray) the JSON form,
so the protocol's values stay JSON for them (`binary_envelopes(platform)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from veil.platform.instance import InstanceInfo
from veil.platform.spec import FunctionSpec


@dataclass(frozen=True)
class Routing:
    """How a model-routing platform should place requests of one function.

    `policy`: a packing policy name (`veil.packer.policies`: "veil", ...) or "platform" for the
    platform's own default (Ray Serve's multiplex-aware power-of-two router). The sizes are the
    packer's memory model (`veil.packer.PoolSpec`): what the runtime uses before any model
    (`base_mb`) and each model's resident size (`model_mb`, `default_model_mb` otherwise).
    `unload_value`: the request body that makes an instance drop a model, with the model id put
    under `unload_key` (None: the runtime manages its own cache and cannot be told to drop one).
    """

    policy: str = "veil"
    base_mb: float = 80.0
    default_model_mb: float = 40.0
    model_mb: dict[str, float] = field(default_factory=dict)
    unload_value: dict[str, Any] | None = None
    unload_key: str = "model"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Routing:
        return cls(**data)

    def unload_request(self, model: str) -> dict[str, Any] | None:
        """The body that drops `model` from an instance (None if the runtime has no such call)."""
        if self.unload_value is None:
            return None
        return {**self.unload_value, self.unload_key: model}


@runtime_checkable
class Platform(Protocol):
    """Deploy, invoke, scale, unload, meter. Implementations raise `PlatformError` (and
    `ActionError` for the action's own `{"error": ...}`) with the same codes and statuses."""

    #: "local", "ray", ...: for logs and metrics, never for branching on behaviour.
    kind: str
    #: True if the platform places requests by model itself (see the module docstring).
    routes_models: bool

    def deploy(self, spec: FunctionSpec, *, routing: Routing | None = None) -> None:
        """Create or update a function (idempotent)."""
        ...

    def invoke(self, name: str, value: dict, *, timeout: float = 60.0, model: str | None = None) -> dict:
        """Run `value` on the function within `timeout` s; `model` lets a model-routing
        platform keep the model on the instance that has it (others ignore it)."""
        ...

    def scale(self, name: str, *, min_instances: int | None = None, max_instances: int | None = None) -> None:
        """Change the function's instance bounds at once (0 minimum = scale to zero)."""
        ...

    def unload(self, name: str, model: str) -> int:
        """Ask every live instance to drop `model`; returns how many did. Needs the routing's
        unload request (0 when the runtime manages its own cache)."""
        ...

    def metrics(self, name: str | None = None) -> dict[str, Any]:
        """JSON-safe metrics of one function (or all): requests, outcomes, cold starts,
        instances, instance_seconds, gb_seconds, ..."""
        ...

    def functions(self) -> list[str]: ...

    def remove(self, name: str) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class InstanceControl(Protocol):
    """What a caller needs to place requests on instances itself (platforms with
    `routes_models = False`): the packer's policy then starts, targets and stops instances."""

    def instances(self, name: str) -> list[InstanceInfo]: ...

    def start_instance(self, name: str) -> str: ...

    def invoke_instance(self, name: str, instance_id: str, value: dict, *, timeout: float = 60.0) -> dict: ...

    def stop_instance(self, name: str, instance_id: str, *, drain_s: float = 10.0) -> None: ...

    def set_keep_alive(self, name: str, instance_id: str, seconds: float) -> None: ...


def binary_envelopes(platform: object) -> bool:
    """Whether `platform` takes binary envelope values (protocol attribute; default False)."""
    return bool(getattr(platform, "binary_envelopes", False))


def routes_models(platform: object) -> bool:
    """Whether `platform` places requests by model itself (protocol attribute; a platform that
    does not declare it is one the caller places requests on, like the local one)."""
    return bool(getattr(platform, "routes_models", False))
