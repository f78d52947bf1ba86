"""Veil's packing policy as a Ray Serve request router (needs `veil[ray]`).

It lives with the policy, in the packer: the Ray platform names it by import path in the
deployment's `request_router_config` (`veil.platform.ray_serve.options.ROUTER_CLASS`), so data
still flows one way (packer -> platform) and `veil.platform` never imports the packer.

Serve creates one router per deployment handle (in the caller's process: here the Veil
platform's) and asks it, per request, which replicas to try (`choose_replicas`). This router
answers with the replica that `veil.packer.policies.veil.VeilPolicy` picks, the same pure
policy the local packer and the simulator run: the replica where the model is warm with a
free slot, else the cheapest by expected wait (a short queue on a warm replica, or the least
loaded one with memory room, evicting its least recently used idle models). Its decisions
travel with the request (`veil={"evict": [...], "keepalive_s": w}`): the replica drops the
evicted models, and keeps the model for the keep-alive window the policy learned from the
model's inter-arrival times, then reports itself idle to the autoscaler.

What differs from the local packer is who owns the replica count: Serve's autoscaler starts and
stops replicas. The router therefore never scales out itself (the policy's instance limit is the
number of replicas Serve has): a request the policy cannot place waits in the handle's queue,
which is what Serve's autoscaler scales on; replicas appear here through `update_replicas` and
are adopted by the policy; replicas Serve stops are forgotten.

The policy's state is per router (per handle). Veil sends every request of a function through
one handle in the platform process, so the router sees all of the function's traffic.

Serve's callbacks: `on_request_routed` when a replica accepted a request, `on_request_completed`
when it finished or was refused (a full replica refuses under Serve's strict admission). Serve
asks again for a request its chosen replica could not take (full, or refused); each time, the
placement is released and made afresh without counting a second arrival, so capacity that
appeared meanwhile (a replica the autoscaler added for a burst) is used at once.

The direct path (`veil.platform.ray_serve.direct`): the platform asks `place_direct` from the
caller's thread; a request the policy places on a running replica that holds its model with a
free slot is sent to that replica without Serve's routing, and handed back with `direct_done`.
Everything else (a load, a queue, no replica) takes the handle; a request whose arrival
`place_direct` counted already says so (`veil={"arrived": True}`), and its first placement here
does not count it again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from veil.packer.keepalive import KeepAliveLearner
from veil.packer.policies.veil import VeilPolicy
from veil.packer.state import PoolSpec, Reject, Route, Stop

log = logging.getLogger("veil.packer.ray_router")

#: How often the policy's keep-alive clock runs (at most), in seconds.
TICK_S = 0.1
#: How long a completion Serve reported before the request's acceptance waits for the latter
#: (seconds): then it is taken for a refusal whose retry never came (the caller gave up).
SETTLE_S = 2.0
#: How long a replica whose direct request found it gone gets no direct request (seconds):
#: Serve's replica list drops a dead one within about this; a live one is trusted again.
DIRECT_SUSPECT_S = 5.0


@dataclass
class _Placement:
    """Where one request was placed. `route` is the policy's admission (None for a request
    without a model id, placed by load only, or once released after a refusal)."""

    pending: PendingRequest | None  # None: a direct request (no Serve request behind it)
    replica: str
    route: Route | None
    accepted_at: float | None = None
    held: bool = True  # counted in the policy's (or the model-less) accounting
    waiting: bool = False  # held on a full replica, not offered to Serve (see `_wait`)
    placed_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None  # Serve said "completed" before it said "accepted" (see there)


@dataclass
class DirectPlacement:
    """A warm request placed for the direct path: its replica, the key of its placement, and
    the policy's hints for the replica (`veil=` of the request)."""

    replica: RunningReplica
    key: str
    hints: dict[str, Any]
    placement: _Placement


class VeilRequestRouter(RequestRouter):
    """Routes each request to the replica Veil's packing policy chooses."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Serve with the deployment's `request_router_kwargs` (see options.py)."""
        self._spec = PoolSpec(
            function=str(kwargs.get("function", "veil")),
            capacity=int(kwargs.get("capacity", 4)),
            memory_mb=float(kwargs.get("memory_mb", 512.0)),
            base_mb=float(kwargs.get("base_mb", 80.0)),
            max_instances=0,
            idle_timeout_s=float(kwargs.get("idle_timeout_s", 60.0)),
            model_mb={str(k): float(v) for k, v in dict(kwargs.get("model_mb") or {}).items()},
            default_model_mb=float(kwargs.get("default_model_mb", 40.0)),
        )
        # Keep-alives shorter than a replica start do not pay on Ray (see RayOptions).
        min_keepalive = float(kwargs.get("min_keepalive_s", 1.0))
        learner = KeepAliveLearner(self._spec.idle_timeout_s, min_s=min(min_keepalive, self._spec.idle_timeout_s))
        self._policy = VeilPolicy(self._spec, learner)
        self._placements: dict[str, _Placement] = {}
        self._plain: dict[str, int] = {}  # replica -> model-less requests in flight
        self._waiting: dict[str, int] = {}  # replica -> requests held on it, waiting for a slot
        self._lock = threading.Lock()
        self._last_tick = 0.0
        self._live: dict[str, RunningReplica] = {}  # replicas as last synced (direct path)
        self._suspect: dict[str, float] = {}  # replica -> until when no direct request goes there

    @property
    def policy(self) -> VeilPolicy | None:
        return getattr(self, "_policy", None)

    # -- replicas ----------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        if self.policy is not None:
            with self._lock:
                self._sync(replicas, time.monotonic())
        super().update_replicas(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        if self.policy is not None:
            with self._lock:
                self._forget(replica_id.unique_id, time.monotonic())

    def _sync(self, replicas: list[RunningReplica], now: float) -> None:
        """Adopt replicas Serve started, forget those it stopped (call under the lock)."""
        policy = self._policy
        live = {r.replica_id.unique_id: r for r in replicas}
        for rid in [i for i in policy.instances if i not in live]:
            self._forget(rid, now)
        for rid, replica in live.items():
            if rid not in policy.instances:
                resident = tuple(sorted(replica.multiplexed_model_ids))
                policy.adopt(rid, now, capacity=replica.max_ongoing_requests, resident=resident)
        policy.spec = dataclasses.replace(policy.spec, max_instances=len(live))
        self._live = live

    def _forget(self, rid: str, now: float) -> None:
        self._policy.lost(rid, now)
        self._plain.pop(rid, None)
        self._waiting.pop(rid, None)
        self._live.pop(rid, None)
        self._suspect.pop(rid, None)
        for key in [k for k, p in self._placements.items() if p.replica == rid]:
            del self._placements[key]  # Serve fails or retries those requests; a retry re-places

    # -- routing -----------------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if self.policy is None or pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = pending_request.metadata.internal_request_id
        model = pending_request.metadata.multiplexed_model_id
        now = time.monotonic()
        with self._lock:
            self._housekeeping(now)
            placed = self._placements.get(key)
            if placed is not None:
                # Asked again: the replica it was placed on had no free slot (or refused it).
                # Place it afresh: replicas Serve's autoscaler added since are options now, so a
                # burst queued behind a warm replica spreads as capacity arrives.
                self._release(placed, now)
            if not model:
                rid = min(by_id, key=lambda r: (self._load(r), r))
                self._plain[rid] = self._plain.get(rid, 0) + 1
                self._placements[key] = _Placement(pending_request, rid, None)
                return [[by_id[rid]]]
            # (a request `place_direct` counted already, then sent here, is placed as a retry)
            arrived = placed is not None or bool((pending_request.kwargs.get("veil") or {}).get("arrived"))
            decision = self._policy.reroute(model, now) if arrived else self._policy.route(model, now)
            if isinstance(decision, Reject):
                # No replica has room now: wait (Serve backs off and asks again). The arrival
                # is recorded: the next attempt re-places without counting it again.
                self._placements[key] = _Placement(pending_request, "", None, held=False)
                pending_request.routing_context.should_backoff = True
                return []
            if decision.instance not in by_id:  # the policy's view lags Serve's by a moment
                self._policy.complete(decision, now, 0.0, False)
                self._placements[key] = _Placement(pending_request, "", None, held=False)
                return [candidate_replicas]
            chosen = self._policy.instances[decision.instance]
            if chosen.total_inflight - self._waiting.get(chosen.id, 0) > chosen.capacity:
                # The cheapest option is a queue on a full replica. Serve cannot queue on a
                # replica, so the request waits here and is placed again shortly (see `_wait`).
                return self._wait(pending_request, key, decision)
            self._placements[key] = _Placement(pending_request, decision.instance, decision)
            pending_request.kwargs["veil"] = {
                "evict": list(decision.evict),
                "keepalive_s": self._policy.keepalive.keepalive(model),
            }
            return [[by_id[decision.instance]]]

    def _wait(self, pending_request: PendingRequest, key: str, decision: Route) -> list:
        """Hold a request on the full replica the policy queued it on, without offering that
        replica to Serve (call under the lock).

        Offered a full replica, Serve's base router asks that replica for its queue length on
        every attempt, without backing off, with a deadline that doubles (to 1 s) each time the
        busy replica answers late: in a burst of cold requests on a loaded machine, requests
        sat seconds behind the model loads of the replica they were queued on, while the same
        burst under Serve's default router (which backs off) drained in well under one. The
        policy's count of requests in flight per replica is exact (every request of the
        function goes through this router), so a full replica is not offered at all: the
        request backs off in the handle's queue (`RayOptions.router_backoff_s`, a few ms) and
        is placed afresh, taking the first slot that frees or a replica Serve adds. Meanwhile
        its placement stays held, so the policy prices that replica's queue with every request
        waiting for it, and the next requests of a burst spill over to other replicas (a cold
        load there) once the queue is the longer wait; replicas are full only for requests
        actually sent (`_waiting` is left out of that test)."""
        self._placements[key] = _Placement(pending_request, decision.instance, decision, waiting=True)
        self._waiting[decision.instance] = self._waiting.get(decision.instance, 0) + 1
        pending_request.routing_context.should_backoff = True
        return []

    # -- the direct path (called from the caller's thread) ------------------------------------

    def place_direct(self, model: str) -> tuple[DirectPlacement | None, bool]:
        """Place a request for `model` for the direct path: (its placement, True) when the
        policy puts it on a running replica that holds the model with a free slot; (None,
        arrived) otherwise, `arrived` saying whether its arrival was counted (the handle's
        placement then must not count it again). A warm replica is looked for first, so a
        request that cannot go direct (no warm slot) is left to the handle uncounted."""
        from veil.platform.ray_serve.direct import new_request_key  # (the platform's module)

        if self.policy is None or not model:
            return None, False
        now = time.monotonic()
        with self._lock:
            self._housekeeping(now)
            if not any(self._warm_slot(inst, model, now) for inst in self._policy.instances.values()):
                return None, False
            decision = self._policy.route(model, now)
            if isinstance(decision, Reject):  # (cannot happen with a warm slot; kept safe)
                return None, True
            inst = self._policy.instances.get(decision.instance)
            ok = (
                inst is not None
                and not (decision.start or decision.load or decision.cold or decision.evict)
                and inst.total_inflight <= inst.capacity
                and decision.instance in self._live
                and self._suspect.get(decision.instance, 0.0) <= now
            )
            if not ok:
                self._policy.complete(decision, now, 0.0, False)
                return None, True
            key = new_request_key()
            placement = _Placement(None, decision.instance, decision, accepted_at=now)
            self._placements[key] = placement
            hints = {"evict": [], "keepalive_s": self._policy.keepalive.keepalive(model)}
            return DirectPlacement(self._live[decision.instance], key, hints, placement), True

    def _warm_slot(self, inst: Any, model: str, now: float) -> bool:
        return (
            model in inst.resident
            and inst.ready
            and inst.total_inflight < inst.capacity
            and inst.id in self._live
            and self._suspect.get(inst.id, 0.0) <= now
        )

    def direct_done(self, placed: DirectPlacement, ran_s: float | None) -> None:
        """A direct request ended: `ran_s` is its run time, None if it failed or timed out."""
        now = time.monotonic()
        with self._lock:
            if self._placements.get(placed.key) is not placed.placement:
                return  # its replica was forgotten meanwhile, and its placements with it
            del self._placements[placed.key]
            self._release(placed.placement, now, ran_s=ran_s)

    def direct_gone(self, rid: str) -> None:
        """A direct request found replica `rid` gone: no direct request goes there for a while
        (Serve's replica list, or a request through the handle, settles what it is)."""
        with self._lock:
            if rid in self._live:
                self._suspect[rid] = time.monotonic() + DIRECT_SUSPECT_S

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if self.policy is None:
            return
        now = time.monotonic()
        with self._lock:
            key = pending_request.metadata.internal_request_id
            placed = self._placements.get(key)
            if placed is None:
                return
            placed.accepted_at = now
            if placed.ended_at is not None:  # it ran, and Serve's completion came first
                del self._placements[key]
                self._release(placed, now, ran_s=max(0.0, placed.ended_at - placed.placed_at))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.policy is None:
            return
        now = time.monotonic()
        with self._lock:
            placed = self._placements.get(internal_request_id)
            if placed is None or (placed.replica and placed.replica != replica_id.unique_id):
                return  # (an unplaced request, replica "", went wherever Serve sent it)
            if not placed.held and not placed.replica:  # placed by Serve, not by the policy
                del self._placements[internal_request_id]
                return
            if placed.accepted_at is None:
                # Refused (the replica was full: Serve asks again, and the placement is released
                # then), or accepted and done already: Serve registers its completion callback
                # before it reads the replica's answer to "accepted?", and for a fast request the
                # completion runs first. Which of the two it was, the next call says:
                # `on_request_routed` (it ran) or `choose_replicas` (refused); `SETTLE_S` bounds
                # the wait. (Releasing it as refused here had every fast request counted as
                # failed, so the policy forgot each model it had just placed.)
                placed.ended_at = now
                return
            del self._placements[internal_request_id]
            self._release(placed, now, ran_s=now - placed.accepted_at)

    # -- internals (call under the lock) -----------------------------------------------------

    def _release(self, placed: _Placement, now: float, *, ran_s: float | None = None) -> None:
        """End a placement's hold on its slot: `ran_s` is the run time of a request that ran,
        None for one that did not (refused, cancelled). Idempotent."""
        if not placed.held:
            return
        placed.held = False
        if placed.waiting:
            placed.waiting = False
            left = self._waiting.get(placed.replica, 0) - 1
            if left > 0:
                self._waiting[placed.replica] = left
            else:
                self._waiting.pop(placed.replica, None)
        if placed.route is not None:
            self._policy.complete(placed.route, now, ran_s or 0.0, ran_s is not None)
        else:
            self._plain_done(placed.replica)

    def _plain_done(self, rid: str) -> None:
        if rid in self._plain:
            self._plain[rid] = max(0, self._plain[rid] - 1)

    def _load(self, rid: str) -> int:
        inst = self._policy.instances.get(rid)
        return self._plain.get(rid, 0) + (inst.total_inflight if inst is not None else 0)

    def _housekeeping(self, now: float) -> None:
        """Release placements of requests cancelled before any replica took them, and run the
        policy's keep-alive clock (models whose window ended leave its view, as they leave the
        replica; an instance the policy would stop stays, empty, since Serve owns replicas)."""
        if now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        for key, placed in list(self._placements.items()):
            if placed.accepted_at is not None or placed.pending is None:
                continue
            if placed.pending.future.cancelled() or (placed.ended_at is not None and now - placed.ended_at > SETTLE_S):
                del self._placements[key]
                self._release(placed, now)
        seqs = {i.id: i.seq for i in self._policy.instances.values()}
        replicas = self._replicas_by_uid()
        for action in self._policy.tick(now):
            if isinstance(action, Stop) and action.instance in replicas:
                # The policy would stop an instance holding no model; Serve owns the replica,
                # which stays (empty) until the autoscaler removes it.
                self._policy.adopt(
                    action.instance,
                    now,
                    capacity=replicas[action.instance].max_ongoing_requests,
                    seq=seqs.get(action.instance),
                )

    def _replicas_by_uid(self) -> dict[str, RunningReplica]:
        return {rid.unique_id: r for rid, r in self.curr_replicas.items()}
