"""The packer on a platform that places requests by model itself (`routes_models`, e.g. Ray).

There the packing policy runs inside the platform's request router, next to the replicas'
live state, so the packer does not pick instances: it deploys the function once with the
policy's name and memory model (`Routing`), passes the model id with every invoke, and keeps
the same per-request records as the instance-placing packer, so `stats()` reads the same.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

from veil.packer.metrics import RequestRecord
from veil.platform import FunctionSpec, PlatformError
from veil.platform.protocol import Platform, Routing

#: Policies a model-routing platform can run in its router; "platform" = its own default.
ROUTED_POLICIES = ("veil", "platform")
_SENTINEL = "\x00veil-model\x00"


def unload_routing(unload_value: Callable[[str], dict] | None) -> tuple[dict | None, str]:
    """Turn the packer's `unload_value(model) -> body` into a JSON template and the key the
    model id goes under (a router in another process cannot call a Python function)."""
    if unload_value is None:
        return None, "model"
    body = unload_value(_SENTINEL)
    keys = [k for k, v in body.items() if v == _SENTINEL]
    if len(keys) != 1:
        raise ValueError("unload_value(model) must put the model id under exactly one top-level key")
    return {k: v for k, v in body.items() if k != keys[0]}, keys[0]


class RoutedExecutor:
    """Deploys `template` once with `routing` and invokes it with the model id."""

    def __init__(
        self,
        platform: Platform,
        template: FunctionSpec,
        routing: Routing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if routing.policy not in ROUTED_POLICIES:
            raise PlatformError(
                "bad_spec",
                f"policy {routing.policy!r} cannot run inside the {platform.kind} platform's router "
                f"(choose one of {', '.join(ROUTED_POLICIES)})",
            )
        self.platform = platform
        self.function = template.name
        self.routing = routing
        self._clock = clock
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._origin = clock()
        platform.deploy(copy.deepcopy(template), routing=routing)

    def invoke(self, model: str, value: dict, *, timeout: float) -> dict:
        t0 = self._clock()
        ok, error = False, ""
        try:
            result = self.platform.invoke(self.function, value, timeout=timeout, model=model)
            ok = True
            return result
        except PlatformError as exc:
            error = exc.code
            raise
        finally:
            end = self._clock()
            with self._lock:
                self._records.append(RequestRecord(t0 - self._origin, model, end - t0, False, ok, "", error))

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def elapsed(self) -> float:
        return self._clock() - self._origin
