"""The instances of one function and the scheduling over them (one OpenWhisk invoker's worth).

Rules, all applied under one condition variable per function:
- a request takes a free slot on a ready instance, preferring the most recently used one so the
  others go idle and can be reaped;
- else it reserves a slot on an instance that is still starting, if that one has room;
- else it cold-starts a new instance if fewer than `max_instances` are alive (starting ones
  count, so concurrent cold starts never exceed the limit);
- else it queues (at most `max_queue` waiters, beyond that "busy"), until its deadline.
The pool owner (the reaper) calls `reap()` periodically to stop idle instances (scale to zero,
respecting `min_instances`), drain instances of an old spec, and notice instances that died
while idle. Whoever removes an instance from `instances` under the lock owns its termination;
for an instance still starting, its start thread does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from veil.platform.errors import PlatformError
from veil.platform.instance import (
    DEAD,
    DRAINING,
    READY,
    STARTING,
    STOPPED,
    Instance,
    InstanceGone,
    InstanceInfo,
    instance_env,
)
from veil.platform.metrics import FunctionMetrics
from veil.platform.spec import FunctionSpec

log = logging.getLogger("veil.platform.pool")

_ALIVE = (STARTING, READY, DRAINING)


@dataclass
class Lease:
    """One slot on one instance, held by one request until `FunctionPool.release`."""

    instance: Instance
    cold: bool  # the request waited for this instance's cold start
    queued_s: float  # time spent waiting for the slot (including any cold start)


class FunctionPool:
    """All live instances of one function, and the slot accounting over them."""

    def __init__(
        self,
        spec: FunctionSpec,
        *,
        log_dir: Path,
        origin: float,
        next_id: Callable[[], int],
        api_host: str = "local",
    ) -> None:
        self.spec = spec
        self.generation = 0
        self.cond = threading.Condition()
        self.instances: list[Instance] = []
        self.queued = 0  # waiters of acquire (in _fifo) and of acquire_on
        self._fifo: deque[object] = deque()
        self.closed = False
        self.metrics = FunctionMetrics(spec.name, origin)
        self._log_dir = log_dir
        self._next_id = next_id
        self._api_host = api_host
        self._start_threads: list[threading.Thread] = []
        self._ended: OrderedDict[str, str] = OrderedDict()  # recent instance id -> why it ended
        self._fail_streak = 0
        self._next_min_start = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    # -- helpers (call under self.cond) ----------------------------------------------------

    def _alive_count(self) -> int:
        return sum(1 for i in self.instances if i.state in _ALIVE)

    def _find(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.id == instance_id), None)

    def _pick_ready(self) -> Instance | None:
        room = [
            i
            for i in self.instances
            if i.state == READY and i.generation == self.generation and i.inflight < self.spec.concurrency
        ]
        return max(room, key=lambda i: i.last_used_mono) if room else None

    def _pick_starting(self) -> Instance | None:
        room = [
            i
            for i in self.instances
            if i.state == STARTING and i.generation == self.generation and i.inflight < self.spec.concurrency
        ]
        return max(room, key=lambda i: i.inflight) if room else None

    def _remember_end(self, instance_id: str, why: str) -> None:
        self._ended[instance_id] = why
        while len(self._ended) > 256:
            self._ended.popitem(last=False)

    def _check_open(self) -> None:
        if self.closed:
            raise PlatformError("closed", f"function {self.name!r} was removed or the platform closed")

    def _instance_env(self, instance_id: str) -> dict[str, str]:
        return instance_env(self.spec, instance_id, self._api_host)

    def _begin_start(self) -> Instance:
        """Create a STARTING instance and spawn + /init it on a thread (so waiters keep their
        own deadlines and a slow start never blocks the lock)."""
        instance_id = f"{self.spec.name}-{self._next_id()}"
        inst = Instance(
            instance_id=instance_id,
            function=self.spec.name,
            command=self.spec.command,
            env=self._instance_env(instance_id),
            memory_mb=self.spec.memory_mb,
            concurrency=self.spec.concurrency,
            generation=self.generation,
            log_path=self._log_dir / f"{instance_id}.log",
        )
        self.instances.append(inst)
        self.metrics.instance_started(inst.id, inst.memory_mb, inst.started_mono)
        t = threading.Thread(
            target=self._run_start,
            args=(inst, dict(self.spec.init_value), self.spec.start_timeout_s),
            name=f"veil-start-{instance_id}",
            daemon=True,
        )
        self._start_threads = [x for x in self._start_threads if x.is_alive()]
        self._start_threads.append(t)
        t.start()
        return inst

    def _run_start(self, inst: Instance, init_value: dict, start_timeout_s: float) -> None:
        deadline = time.monotonic() + start_timeout_s
        error: PlatformError | None = None
        try:
            inst.spawn()
            inst.initialize(init_value, deadline, cancelled=lambda: inst.state == STOPPED)
        except PlatformError as e:
            error = e
        except Exception as e:  # a bug or an OS error must not leave waiters hanging
            log.exception("starting instance %s of %r failed", inst.id, self.name)
            error = PlatformError("start_failed", f"function {self.name!r}: instance {inst.id} failed to start: {e}")
        if error is not None:
            # Kill and bill the failed start before waiters hear of it, so what they observe
            # next (instances, metrics) is already consistent.
            inst.terminate(grace=0.5)
            self.metrics.instance_ended(inst.id, time.monotonic())
        now = time.monotonic()
        with self.cond:
            stopped = inst.state == STOPPED
            if error is None and not stopped:
                inst.state = READY
                inst.ready_mono = inst.last_used_mono = now
                self._fail_streak = 0
                self.metrics.instance_ready(now - inst.started_mono)
            elif not stopped:
                inst.state = DEAD
                inst.start_error = error
                if inst in self.instances:
                    self.instances.remove(inst)
                self._remember_end(inst.id, "failed to start")
                self._fail_streak += 1
                self._next_min_start = now + min(30.0, 0.5 * 2**self._fail_streak)
                self.metrics.start_failed()
            self.cond.notify_all()
        if stopped:  # stopped while starting: this thread owns the process
            inst.terminate(grace=0.5)
            self.metrics.instance_ended(inst.id, time.monotonic())
        elif error is None:
            log.info(
                "function %r: instance %s ready on port %d in %.0f ms",
                self.name,
                inst.id,
                inst.port,
                (now - inst.started_mono) * 1000,
            )
        else:
            log.warning("%s", error.message)

    # -- slots -----------------------------------------------------------------------------

    def acquire(self, deadline: float) -> Lease:
        """A slot on some instance, cold-starting or queueing as the rules above say.

        Waiters are served first come, first served: a newcomer never takes a freed slot while
        others are queued, so queue times are fair and nobody starves until its deadline.
        """
        t0 = time.monotonic()
        ticket = object()
        with self.cond:
            reserved: Instance | None = None
            queued = False
            try:
                while True:
                    self._check_open()
                    if reserved is not None:
                        if reserved.state in (READY, DRAINING):
                            lease = Lease(reserved, cold=True, queued_s=time.monotonic() - t0)
                            reserved = None
                            return lease
                        if reserved.state != STARTING:
                            err = reserved.start_error or PlatformError(
                                "start_failed",
                                f"function {self.name!r}: instance {reserved.id} was stopped before it became ready",
                            )
                            reserved = None
                            raise err
                    else:
                        my_turn = not self._fifo or self._fifo[0] is ticket
                        inst = self._pick_ready() if my_turn else None
                        if inst is not None:
                            inst.inflight += 1
                            return Lease(inst, cold=False, queued_s=time.monotonic() - t0)
                        if my_turn:
                            inst = self._pick_starting()
                            if inst is None and self._alive_count() < self.spec.max_instances:
                                inst = self._begin_start()
                        if inst is not None:
                            inst.inflight += 1
                            reserved = inst
                            if queued:
                                self._leave_queue(ticket)
                                queued = False
                            continue
                        if not queued:
                            if self.queued >= self.spec.max_queue:
                                raise self._busy()
                            self._fifo.append(ticket)
                            self.queued += 1
                            queued = True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._wait_timeout(t0, reserved)
                    self.cond.wait(remaining)
            finally:
                if queued:
                    self._leave_queue(ticket)
                if reserved is not None:  # leaving with an exception: give the slot back
                    reserved.inflight = max(0, reserved.inflight - 1)
                    self.cond.notify_all()

    def _leave_queue(self, ticket: object) -> None:
        """Drop a waiter's ticket and wake the others: the next in line may go now."""
        self._fifo.remove(ticket)
        self.queued -= 1
        self.cond.notify_all()

    def acquire_on(self, instance_id: str, deadline: float) -> Lease:
        """A slot on one given instance (the packer's routing), waiting for room or readiness."""
        t0 = time.monotonic()
        waited_start = False
        with self.cond:
            queued = False
            try:
                while True:
                    self._check_open()
                    inst = self._find(instance_id)
                    if inst is None:
                        why = self._ended.get(instance_id)
                        code = "instance_crashed" if why == "crashed" else "unknown_instance"
                        raise PlatformError(
                            code,
                            f"function {self.name!r}: instance {instance_id!r} "
                            + (f"{why}" if why else "does not exist"),
                        )
                    if inst.state == DRAINING:
                        raise PlatformError(
                            "unknown_instance",
                            f"function {self.name!r}: instance {instance_id!r} is draining "
                            "(being stopped or replaced by a re-deploy)",
                        )
                    if inst.state == READY and inst.inflight < self.spec.concurrency:
                        inst.inflight += 1
                        return Lease(inst, cold=waited_start, queued_s=time.monotonic() - t0)
                    waited_start = waited_start or inst.state == STARTING
                    if not queued:
                        if self.queued >= self.spec.max_queue:
                            raise self._busy(instance_id)
                        self.queued += 1
                        queued = True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PlatformError(
                            "timeout",
                            f"function {self.name!r}: no free slot on instance {instance_id} "
                            f"within {time.monotonic() - t0:.2f} s",
                        )
                    self.cond.wait(remaining)
            finally:
                if queued:
                    self.queued -= 1

    def release(self, lease: Lease, *, served: bool) -> None:
        with self.cond:
            inst = lease.instance
            inst.inflight = max(0, inst.inflight - 1)
            if served:
                inst.requests += 1
            inst.last_used_mono = time.monotonic()
            self.cond.notify_all()

    def instance_gone(self, lease: Lease, gone: InstanceGone) -> bool:
        """A request lost its instance. Returns True if the instance crashed (it is then removed,
        its slots freed and its process killed); False if it was stopped on purpose or the
        process is still alive (only the connection broke: the slot is simply released)."""
        inst = lease.instance
        owner = False
        with self.cond:
            inst.inflight = max(0, inst.inflight - 1)
            if inst.state == STOPPED:
                crashed = False
            elif gone.exit_code is None and inst.exit_code() is None:
                crashed = False
                inst.last_used_mono = time.monotonic()
            else:
                crashed = True
                if inst in self.instances:
                    self.instances.remove(inst)
                    owner = True
                inst.state = DEAD
                inst.inflight = 0
                self._remember_end(inst.id, "crashed")
            self.cond.notify_all()
        if owner:
            log.warning("function %r: instance %s %s during a request; removed", self.name, inst.id, gone.reason)
            inst.terminate(grace=0.2)
            self.metrics.instance_ended(inst.id, time.monotonic(), crashed=True)
        return crashed

    # -- explicit control --------------------------------------------------------------------

    def start_instance(self) -> str:
        """Cold-start one instance now (within max_instances); block until /init is done."""
        with self.cond:
            self._check_open()
            if self._alive_count() >= self.spec.max_instances:
                raise PlatformError(
                    "busy",
                    f"function {self.name!r}: already at max_instances={self.spec.max_instances}",
                )
            inst = self._begin_start()
            deadline = time.monotonic() + self.spec.start_timeout_s + 5.0
            while inst.state == STARTING:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PlatformError(
                        "timeout", f"function {self.name!r}: instance {inst.id} did not finish starting in time"
                    )
                self.cond.wait(remaining)
            if inst.state in (READY, DRAINING):
                return inst.id
            raise inst.start_error or PlatformError(
                "start_failed", f"function {self.name!r}: instance {inst.id} was stopped while starting"
            )

    def stop_instance(self, instance_id: str, *, drain_s: float = 10.0) -> None:
        """Stop routing to the instance, let in-flight requests finish (up to `drain_s`), stop it."""
        with self.cond:
            inst = self._find(instance_id)
            if inst is None:
                raise PlatformError("unknown_instance", f"function {self.name!r}: no live instance {instance_id!r}")
            if inst.state == STARTING:
                inst.state = STOPPED  # its start thread terminates it
                self.instances.remove(inst)
                self._remember_end(inst.id, "was stopped")
                self.cond.notify_all()
                return
            inst.state = DRAINING
            deadline = time.monotonic() + drain_s
            while inst.inflight > 0 and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            if inst not in self.instances:
                return  # someone else (reaper, crash handling) took it
            self.instances.remove(inst)
            inst.state = STOPPED
            self._remember_end(inst.id, "was stopped")
            self.cond.notify_all()
        self._terminate(inst)

    def set_keep_alive(self, instance_id: str, seconds: float) -> None:
        with self.cond:
            inst = self._find(instance_id)
            if inst is None:
                raise PlatformError("unknown_instance", f"function {self.name!r}: no live instance {instance_id!r}")
            if seconds < 0:
                raise PlatformError("bad_spec", f"keep-alive must be >= 0 (got {seconds})")
            inst.keep_alive_s = seconds

    def update_spec(self, spec: FunctionSpec) -> None:
        """Re-deploy: scaling knobs apply at once; a changed command/env/init/memory drains the
        old instances (they finish their requests, take no new ones, and are stopped)."""
        with self.cond:
            if spec.instance_identity() != self.spec.instance_identity():
                self.generation += 1
            self.spec = spec
            self.cond.notify_all()

    def infos(self) -> list[InstanceInfo]:
        with self.cond:
            return [i.info(self.spec.idle_timeout_s) for i in self.instances]

    def state(self) -> dict[str, int]:
        with self.cond:
            return {
                "queued": self.queued,
                "inflight": sum(i.inflight for i in self.instances),
                "starting": sum(1 for i in self.instances if i.state == STARTING),
                "ready": sum(1 for i in self.instances if i.state == READY),
                "draining": sum(1 for i in self.instances if i.state == DRAINING),
            }

    # -- housekeeping ----------------------------------------------------------------------

    def reap(self) -> None:
        """One reaper pass: drop dead instances, stop idle and drained ones, keep min_instances."""
        now = time.monotonic()
        crashed: list[Instance] = []
        stopping: list[Instance] = []
        with self.cond:
            if self.closed:
                return
            for inst in list(self.instances):
                if inst.state in (READY, DRAINING) and inst.exit_code() is not None:
                    self.instances.remove(inst)
                    inst.state = DEAD
                    inst.inflight = 0
                    self._remember_end(inst.id, "crashed")
                    crashed.append(inst)
                elif inst.state == READY and inst.generation != self.generation:
                    inst.state = DRAINING
            for inst in list(self.instances):
                if inst.state == DRAINING and inst.inflight == 0:
                    self.instances.remove(inst)
                    inst.state = STOPPED
                    self._remember_end(inst.id, "was stopped (drained)")
                    stopping.append(inst)

            def keep_alive(i: Instance) -> float:
                return i.keep_alive_s if i.keep_alive_s is not None else self.spec.idle_timeout_s

            idle = sorted(
                (
                    i
                    for i in self.instances
                    if i.state == READY and i.inflight == 0 and now - i.last_used_mono >= keep_alive(i)
                ),
                key=lambda i: i.last_used_mono,
            )
            for inst in idle:
                if self._alive_count() <= self.spec.min_instances:
                    break
                self.instances.remove(inst)
                inst.state = STOPPED
                self._remember_end(inst.id, "was stopped after its idle timeout")
                stopping.append(inst)
            current = sum(1 for i in self.instances if i.state in (STARTING, READY) and i.generation == self.generation)
            while (
                current < self.spec.min_instances
                and now >= self._next_min_start
                and self._alive_count() < self.spec.max_instances
            ):
                self._begin_start()
                current += 1
            if crashed or stopping:
                self.cond.notify_all()
        for inst in crashed:
            log.warning(
                "function %r: instance %s exited on its own (code %s); removed", self.name, inst.id, inst.exit_code()
            )
            inst.terminate(grace=0.2)
            self.metrics.instance_ended(inst.id, time.monotonic(), crashed=True)
        for inst in stopping:
            self._terminate(inst)

    def _terminate(self, inst: Instance) -> None:
        inst.terminate()
        self.metrics.instance_ended(inst.id, time.monotonic())
        log.info("function %r: instance %s stopped", self.name, inst.id)

    def close(self) -> None:
        """Stop every instance (in-flight requests fail), wake all waiters with "closed"."""
        with self.cond:
            self.closed = True
            items = [(i, i.state) for i in self.instances]
            self.instances.clear()
            for inst, _ in items:
                inst.state = STOPPED
                self._remember_end(inst.id, "was stopped (function removed)")
            self.cond.notify_all()
            threads = list(self._start_threads)
        for inst, was in items:
            if was != STARTING:
                self._terminate(inst)
        for t in threads:
            t.join(timeout=5.0)

    # -- errors ----------------------------------------------------------------------------

    def _busy(self, instance_id: str | None = None) -> PlatformError:
        where = (
            f"instance {instance_id}"
            if instance_id
            else (f"all {self._alive_count()} instances (max_instances={self.spec.max_instances})")
        )
        return PlatformError(
            "busy",
            f"function {self.name!r} is busy: {where} at concurrency {self.spec.concurrency} and "
            f"the queue is full ({self.queued} waiting, max_queue={self.spec.max_queue})",
        )

    def _wait_timeout(self, t0: float, reserved: Instance | None) -> PlatformError:
        waited = time.monotonic() - t0
        if reserved is not None:
            why = f"waited {waited:.2f} s for the cold start of instance {reserved.id}"
        else:
            why = (
                f"waited {waited:.2f} s in the queue; all {self._alive_count()} instances "
                f"busy (max_instances={self.spec.max_instances})"
            )
        return PlatformError("timeout", f"function {self.name!r}: no instance in time ({why})")
