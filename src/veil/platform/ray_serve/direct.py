"""Warm requests straight to the replica Veil's router placed them on (Ray Serve 2.60 internals).

Why. A request through a `DeploymentHandle` from a synchronous caller crosses to the handle's
router thread (`run_coroutine_threadsafe`), runs Serve's routing tasks and the replica's
accept/reject protocol (`HandleRequestWithRejection`: a streamed reply whose first message says
whether the replica took it), then crosses back. For the echo action on this machine that is
about 3.5-4 ms per request where the replica's own unary gRPC method, called from the caller's
thread over a kept-open channel, is about 1.8 ms (measured by /tmp profiling of both on one
replica; docs/platform.md, "Warm path"). On a small loaded machine every millisecond of driver
CPU is a millisecond of latency, and this is most of Ray's warm gap to the local platform.

What stays the same. The request is still placed by Veil's router (`VeilRequestRouter.
place_direct`: the same policy, the same accounting, the same keep-alive learning), only when
the policy puts it on a running replica that holds the model with a free slot (a warm hit; a
model load, a full replica, no replica or an unknown one take the handle, so Serve queues them
and its autoscaler sees them). While it runs it is counted in the handle's own autoscaling
metrics (`RouterMetricsManager.inc/dec_num_running_requests_for_replica`, what the handle pushes
to the controller; replica-side metrics, if configured, count it in the replica anyway), and
the replica runs it through Serve's own request path (`HandleRequest`: its concurrency
semaphore, ongoing-request count, request context with the model id), so `serve.
get_multiplexed_model_id()`, health, draining and autoscaling all see it as any request.

Internals used, all of them here and nowhere else (checked when the path is first used; any
missing one makes `DirectPath.available()` False and every request takes the handle):

- `DeploymentHandle._router._asyncio_router`: the handle's `AsyncioRouter` (its
  `request_router`, `_metrics_manager` and `_event_loop`);
- `RunningReplica._replica_info.node_ip/port`: the replica's gRPC server (the one Serve's
  gRPC transport uses), reached through `ray._private.grpc_utils.init_grpc_channel` (Ray's
  token-authentication interceptors) with `serve_pb2` `ASGIRequest`/`ASGIResponse` and Serve's
  cloudpickle `RPCSerializer`;
- `RequestMetadata` and `RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE`.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("veil.platform.ray_serve.direct")

#: gRPC status codes that mean the replica is gone (its process killed, its server stopped).
_GONE = {"UNAVAILABLE", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED"}


class DirectReplicaGone(Exception):
    """The replica of a direct request did not answer (its worker died or stopped)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DirectTimeout(Exception):
    """No answer within the request's timeout (the replica is told to cancel it)."""


class DirectFailed(Exception):
    """The replica answered with an error Serve raised (not a Veil `wire` answer)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class Miss:
    """Not sent directly: take the handle. `arrived`: Veil's router already counted this
    request's arrival (the handle's placement must not count it again)."""

    arrived: bool


class _Internals:
    """Serve 2.60 pieces the direct path needs, imported once (None if any is missing)."""

    def __init__(self) -> None:
        from ray._private.grpc_utils import init_grpc_channel
        from ray.serve._private.common import RequestMetadata
        from ray.serve._private.constants import RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE
        from ray.serve._private.serialization import RPCSerializer
        from ray.serve.generated.serve_pb2 import ASGIRequest
        from ray.serve.generated.serve_pb2_grpc import ASGIServiceStub

        self.init_grpc_channel = init_grpc_channel
        self.RequestMetadata = RequestMetadata
        self.metrics_on_handle = bool(RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE)
        self.serializer = RPCSerializer.get_cached_serializer("cloudpickle", "cloudpickle")
        self.ASGIRequest = ASGIRequest
        self.ASGIServiceStub = ASGIServiceStub


_internals: _Internals | None = None
_internals_lock = threading.Lock()
_internals_failed = False


def _load() -> _Internals | None:
    global _internals, _internals_failed
    with _internals_lock:
        if _internals is None and not _internals_failed:
            try:
                _internals = _Internals()
            except Exception as e:  # another Ray version: the handle serves everything
                _internals_failed = True
                log.warning("Ray Serve's direct replica path is unavailable (%s); using the handle only", e)
        return _internals


class DirectPath:
    """The direct path of one function's handle (thread-safe; one per `_Function`)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[str, Any, Any]] = {}  # replica id -> (address, channel, stub)
        self.sent = 0  # requests answered over the direct path (tests, metrics)
        self.gone = 0  # direct requests whose replica was gone (each retried through the handle)

    def _parts(self) -> tuple[_Internals, Any, Any] | None:
        """(internals, the handle's AsyncioRouter, Veil's router), once the handle has a router
        that is Veil's (the handle creates its router on its first request)."""
        internals = _load()
        if internals is None:
            return None
        outer = getattr(self._handle, "_router", None)
        router = getattr(outer, "_asyncio_router", None)
        if router is None:
            return None
        request_router = getattr(router, "_request_router", None)
        if request_router is None or not hasattr(request_router, "place_direct"):
            return None
        if getattr(router, "_metrics_manager", None) is None or getattr(router, "_event_loop", None) is None:
            return None
        return internals, router, request_router

    def available(self) -> bool:
        return self._parts() is not None

    def call(self, model: str, payload: bytes, timeout: float) -> Any:
        """The replica's `wire` answer, or a `Miss` (send it through the handle). Raises
        `DirectReplicaGone`, `DirectTimeout` or `DirectFailed` for a request that was sent."""
        parts = self._parts()
        if parts is None:
            return Miss(arrived=False)
        internals, router, veil_router = parts
        placed, arrived = veil_router.place_direct(model)
        if placed is None:
            return Miss(arrived=arrived)
        replica = placed.replica
        rid = replica.replica_id
        mm = router._metrics_manager
        t0 = time.monotonic()
        ran: float | None = None
        if internals.metrics_on_handle:
            mm.inc_num_running_requests_for_replica(rid)
        try:
            stub = self._stub(internals, replica)
            meta = internals.RequestMetadata(
                request_id=placed.key,
                internal_request_id=placed.key,
                call_method="__call__",
                multiplexed_model_id=model,
                _by_reference=False,
            )
            request = internals.ASGIRequest(
                pickled_request_metadata=pickle.dumps(meta),
                request_args=internals.serializer.dumps_request((payload,)),
                request_kwargs=internals.serializer.dumps_request({"veil": placed.hints, "timeout": float(timeout)}),
            )
            try:
                response = stub.HandleRequest(request, timeout=max(0.001, timeout))
            except Exception as e:  # grpc.RpcError (imported lazily with grpc itself)
                code = getattr(getattr(e, "code", lambda: None)(), "name", None)
                if code == "DEADLINE_EXCEEDED":
                    raise DirectTimeout() from None
                if code in _GONE or code is None:
                    with self._lock:
                        self.gone += 1
                    self._forget(rid.unique_id)
                    veil_router.direct_gone(rid.unique_id)
                    # as Serve does for an unavailable replica: its queue-length entry is stale
                    router._event_loop.call_soon_threadsafe(_unavailable, router, rid)
                    raise DirectReplicaGone(f"did not answer ({code or type(e).__name__})") from None
                raise DirectFailed(f"gRPC {code}") from None
            if response.is_error:
                err = internals.serializer.loads_response(response.serialized_message)
                cause = getattr(err, "cause", None)
                raise DirectFailed(type(cause if cause is not None else err).__name__)
            answer = internals.serializer.loads_response(response.serialized_message)
            ran = time.monotonic() - t0
            with self._lock:
                self.sent += 1
            return answer
        finally:
            if internals.metrics_on_handle:
                mm.dec_num_running_requests_for_replica(rid)
            veil_router.direct_done(placed, ran)

    def _stub(self, internals: _Internals, replica: Any) -> Any:
        """One kept-open gRPC channel per replica (a new one if its address changed)."""
        info = replica._replica_info
        address = f"{info.node_ip}:{info.port}"
        rid = replica.replica_id.unique_id
        with self._lock:
            entry = self._stubs.get(rid)
            if entry is not None and entry[0] == address:
                return entry[2]
            if len(self._stubs) >= 256:  # replicas come and go: keep the cache bounded
                self._close_all_locked()
            channel = internals.init_grpc_channel(address, asynchronous=False)
            stub = internals.ASGIServiceStub(channel)
            self._stubs[rid] = (address, channel, stub)
            if entry is not None:
                _close(entry[1])
            return stub

    def _forget(self, rid: str) -> None:
        with self._lock:
            entry = self._stubs.pop(rid, None)
        if entry is not None:
            _close(entry[1])

    def _close_all_locked(self) -> None:
        for _, channel, _ in self._stubs.values():
            _close(channel)
        self._stubs.clear()

    def close(self) -> None:
        with self._lock:
            self._close_all_locked()


def new_request_key() -> str:
    return f"veil-direct-{uuid.uuid4().hex}"


def _unavailable(router: Any, rid: Any) -> None:
    try:
        router._active_request_router.on_replica_actor_unavailable(rid)
    except Exception:  # a router shutting down: nothing to invalidate
        log.debug("marking %s unavailable failed", rid, exc_info=True)


def _close(channel: Any) -> None:
    try:
        channel.close()
    except Exception:
        log.debug("closing a replica channel failed", exc_info=True)
