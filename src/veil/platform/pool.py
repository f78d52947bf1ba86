"""The instances of one function and the scheduling over them (one OpenWhisk invoker's worth).

Rules, all applied under one condition variable per function:
- a request takes a free slot on a ready instance, preferring the most recently used one so the
  others go idle and can be reaped;
- else it reserves a slot on an instance that is still starting, if that one has room;
- else it cold-starts a new instance if fewer than `max_instances` are alive (starting ones
  count, so concurrent cold starts never exceed the limit);
- else it queues (at most `max_queue` waiters, beyond that "busy"), until its deadline.
The pool owner (the reaper) calls `reap()` periodically to stop idle instances (scale to zero,
respecting `min_instances`), drain instances of an old spec, notice instances that died while
idle, stop instances over their memory (the watchdog, where no cgroup enforces it), and keep
the warm pool full. Whoever removes an instance from `instances` under the lock owns its
termination; for an instance still starting, its start thread does.

The warm pool (`spec.prewarm`): spare instances, started and initialised but taking no request,
are in `instances` with `spare` set. A cold start takes a ready spare instead of starting a new
instance (the request then waits for no start at all) and the reaper starts a replacement.
With `spec.fork_template` every instance, spare or not, is forked from the function's template.

An instance that let a request run past its deadline is suspect: nothing new is routed to it
while a health probe (its `/healthz` on a fresh connection, and whether the process is stopped)
decides. One that does not answer is unhealthy: requests aimed at it are refused before they
are sent (so a packer places them elsewhere), the ones already on it end at their own
deadlines, and once none is left it is killed and replaced (a SIGSTOPped or wedged runtime).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

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
from veil.platform.memory import MemoryEnforcer
from veil.platform.metrics import FunctionMetrics
from veil.platform.spec import FunctionSpec
from veil.platform.template import Template

log = logging.getLogger("veil.platform.pool")

_ALIVE = (STARTING, READY, DRAINING)
#: how long a suspect instance has to answer its health probe before it is killed
HEALTH_TIMEOUT_S = 1.5
#: a spare taken by a cold start is replaced this much later, not at once: starting the
#: replacement (a fork, then its /init: measurement and attestation) would compete for the CPU
#: with the very cold start that took the spare (its key release, model load, first run)
REFILL_DELAY_S = 0.5
#: why an instance ended -> the code a request aimed at it (or running on it) gets
_END_CODES = {"crashed": "instance_crashed", "was unresponsive": "instance_crashed", "out_of_memory": "out_of_memory"}


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
        enforcer: MemoryEnforcer | None = None,
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
        self._enforcer = enforcer
        self._template: Template | None = None
        self._template_gen = -1
        self._template_thread: threading.Thread | None = None
        self._refill_at = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    # -- helpers (call under self.cond) ----------------------------------------------------

    def _alive_count(self) -> int:
        """Serving instances (the warm pool's spares do not count against max_instances)."""
        return sum(1 for i in self.instances if i.state in _ALIVE and not i.spare)

    def _find(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.id == instance_id), None)

    def _pick_ready(self) -> Instance | None:
        room = [
            i
            for i in self.instances
            if i.state == READY
            and not i.spare
            and not i.suspect
            and i.generation == self.generation
            and i.inflight < self.spec.concurrency
        ]
        return max(room, key=lambda i: i.last_used_mono) if room else None

    def _pick_starting(self) -> Instance | None:
        room = [
            i
            for i in self.instances
            if i.state == STARTING
            and not i.spare
            and i.generation == self.generation
            and i.inflight < self.spec.concurrency
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

    def _take_spare(self) -> Instance | None:
        """A ready spare of the current spec, now a serving instance (the warm pool's hit)."""
        spares = [i for i in self.instances if i.spare and i.state == READY and i.generation == self.generation]
        if not spares:
            return None
        inst = min(spares, key=lambda i: i.started_mono)  # the oldest: it has waited longest
        inst.spare = False
        inst.prewarmed = True
        inst.last_used_mono = time.monotonic()
        self._refill_at = inst.last_used_mono + REFILL_DELAY_S
        self.metrics.promoted(inst.id, time.monotonic())
        self.cond.notify_all()
        return inst

    def _template_for_start(self) -> Template | None:
        """The current spec's fork template (made on first use; replaced on a re-deploy)."""
        if not self.spec.fork_template:
            return None
        if self._template is None or self._template_gen != self.generation:
            old = self._template
            if old is not None:
                threading.Thread(target=old.close, name="veil-template-close", daemon=True).start()
                self.metrics.instance_ended(f"{self.name}-template", time.monotonic())
            self._template = Template(
                self.spec.command,
                self._instance_env(f"{self.spec.name}-template"),
                self._log_dir / f"{self.spec.name}-template.log",
                start_timeout_s=self.spec.start_timeout_s,
            )
            self._template_gen = self.generation
            # billed with the warm pool: it holds memory for the function without serving
            self.metrics.instance_started(f"{self.name}-template", self.spec.memory_mb, time.monotonic(), pool=True)
        return self._template

    def _begin_start(self, *, spare: bool = False) -> Instance:
        """Create a STARTING instance and spawn + /init it on a thread (so waiters keep their
        own deadlines and a slow start never blocks the lock). A serving start takes a ready
        spare of the warm pool instead when there is one."""
        if not spare:
            taken = self._take_spare()
            if taken is not None:
                return taken
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
        inst.spare = spare
        if self._enforcer is not None:
            try:
                inst.confinement = self._enforcer.confine(instance_id, self.spec.memory_mb << 20)
            except OSError as e:
                log.warning("instance %s of %r: no memory limit: %s", instance_id, self.name, e)
        self.instances.append(inst)
        self.metrics.instance_started(inst.id, inst.memory_mb, inst.started_mono, pool=spare)
        t = threading.Thread(
            target=self._run_start,
            args=(inst, dict(self.spec.init_value), self.spec.start_timeout_s, self._template_for_start()),
            name=f"veil-start-{instance_id}",
            daemon=True,
        )
        self._start_threads = [x for x in self._start_threads if x.is_alive()]
        self._start_threads.append(t)
        t.start()
        return inst

    def _run_start(
        self, inst: Instance, init_value: dict, start_timeout_s: float, template: Template | None = None
    ) -> None:
        deadline = time.monotonic() + start_timeout_s
        error: PlatformError | None = None
        try:
            inst.spawn(template)
            inst.initialize(init_value, deadline, cancelled=lambda: inst.state == STOPPED)
        except PlatformError as e:
            error = e
        except Exception as e:  # a bug or an OS error must not leave waiters hanging
            if inst.end_reason is None:  # not the platform stopping it mid-start (client closed)
                log.exception("starting instance %s of %r failed", inst.id, self.name)
            error = PlatformError("start_failed", f"function {self.name!r}: instance {inst.id} failed to start: {e}")
        oom = inst.end_reason == "out_of_memory" or (inst.confinement is not None and inst.confinement.oom_killed())
        if error is not None and oom:
            # the cgroup killed it, or the RSS watchdog stopped it (closing its client under
            # the /init in progress): either way the waiters hear why
            error = PlatformError(
                "out_of_memory",
                f"function {self.name!r}: instance {inst.id} went over its {self.spec.memory_mb} MB "
                "while starting and was stopped",
            )
        if error is not None:
            # Kill and bill the failed start before waiters hear of it, so what they observe
            # next (instances, metrics) is already consistent.
            inst.terminate(grace=0.5)
            self.metrics.instance_ended(inst.id, time.monotonic(), reason=error.code)
            self._release_confinement(inst)
        now = time.monotonic()
        with self.cond:
            stopped = inst.state == STOPPED
            if error is None and not stopped:
                inst.state = READY
                inst.ready_mono = inst.last_used_mono = now
                self._fail_streak = 0
                if inst.spare:
                    self.metrics.spare_ready(now - inst.started_mono)
                else:
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
            self._release_confinement(inst)
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
                    if inst is None or inst.spare:
                        why = self._ended.get(instance_id) if inst is None else None
                        code = _END_CODES.get(why or "", "unknown_instance")
                        raise PlatformError(
                            code,
                            f"function {self.name!r}: instance {instance_id!r} "
                            + (f"{why}" if why else "does not exist"),
                        )
                    if inst.unhealthy:
                        raise PlatformError(
                            "instance_crashed",
                            f"function {self.name!r}: instance {instance_id!r} stopped answering and is being replaced",
                        )
                    if inst.state == DRAINING:
                        raise PlatformError(
                            "unknown_instance",
                            f"function {self.name!r}: instance {instance_id!r} is draining "
                            "(being stopped or replaced by a re-deploy)",
                        )
                    if inst.state == READY and not inst.suspect and inst.inflight < self.spec.concurrency:
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

    def instance_gone(self, lease: Lease, gone: InstanceGone) -> str:
        """A request lost its instance. Returns why: "crashed" (it is then removed, its slots
        freed and its process killed), "out_of_memory" (the same, stopped for going over its
        memory), "unresponsive" (killed by a health probe), or "" if it was stopped on purpose
        or the process is still alive (only the connection broke: the slot is released)."""
        inst = lease.instance
        owner = False
        with self.cond:
            inst.inflight = max(0, inst.inflight - 1)
            if inst.end_reason is not None:
                why = inst.end_reason
            elif inst.state == STOPPED:
                why = ""
            elif gone.exit_code is None and inst.exit_code() is None:
                why = ""
                inst.last_used_mono = time.monotonic()
            else:
                oom = inst.confinement is not None and inst.confinement.oom_killed()
                why = inst.end_reason = "out_of_memory" if oom else "crashed"
                if inst in self.instances:
                    self.instances.remove(inst)
                    owner = True
                inst.state = DEAD
                inst.inflight = 0
                self._remember_end(inst.id, why)
            self.cond.notify_all()
        if owner:
            log.warning(
                "function %r: instance %s %s during a request (%s); removed", self.name, inst.id, gone.reason, why
            )
            inst.terminate(grace=0.2)
            self.metrics.instance_ended(inst.id, time.monotonic(), crashed=True, reason=why)
            self._release_confinement(inst)
        return why

    # -- health and memory -------------------------------------------------------------------

    def suspect(self, inst: Instance) -> None:
        """A request ran past its deadline on `inst`: route nothing new to it until a health
        probe says it is alive; kill it if it is not (see the module docstring)."""
        with self.cond:
            if inst.suspect or inst not in self.instances or inst.state != READY:
                return
            inst.suspect = True
        threading.Thread(target=self._probe, args=(inst,), name=f"veil-probe-{inst.id}", daemon=True).start()

    def _probe(self, inst: Instance) -> None:
        healthy = not _process_stopped(inst.proc.pid if inst.proc is not None else None) and _answers_health(
            inst.port, HEALTH_TIMEOUT_S
        )
        with self.cond:
            if healthy:
                inst.suspect = False
            else:
                inst.unhealthy = True  # the reaper kills it once its requests have ended
            self.cond.notify_all()

    def _kill(self, inst: Instance, reason: str, why: str) -> None:
        """End an instance the platform judged unfit (unresponsive, over its memory) at once."""
        with self.cond:
            if inst not in self.instances:
                return
            inst.end_reason = reason
            if inst.state != STARTING:  # a starting one is its start thread's to remove and report
                self.instances.remove(inst)
                inst.state = DEAD
                self._remember_end(inst.id, why)
            self.cond.notify_all()
        log.warning("function %r: instance %s %s; killed (it is replaced on demand)", self.name, inst.id, why)
        # counted before the kill, so whoever its requests' failures reach sees it in the metrics
        self.metrics.instance_ended(inst.id, time.monotonic(), crashed=True, reason=reason)
        inst.terminate(grace=0.0)
        self._release_confinement(inst)

    def _release_confinement(self, inst: Instance) -> None:
        if inst.confinement is not None:
            inst.confinement.close()

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
        """The serving instances (the warm pool's spares are `spare_infos`)."""
        with self.cond:
            return [i.info(self.spec.idle_timeout_s) for i in self.instances if not i.spare]

    def spare_infos(self) -> list[InstanceInfo]:
        with self.cond:
            return [i.info(self.spec.idle_timeout_s) for i in self.instances if i.spare]

    def template_pid(self) -> int | None:
        with self.cond:
            return self._template.pid() if self._template is not None else None

    def state(self) -> dict[str, int]:
        with self.cond:
            serving = [i for i in self.instances if not i.spare]
            return {
                "queued": self.queued,
                "inflight": sum(i.inflight for i in serving),
                "starting": sum(1 for i in serving if i.state == STARTING),
                "ready": sum(1 for i in serving if i.state == READY),
                "draining": sum(1 for i in serving if i.state == DRAINING),
                "spares_ready": sum(1 for i in self.instances if i.spare and i.state == READY),
                "spares_starting": sum(1 for i in self.instances if i.spare and i.state == STARTING),
            }

    # -- housekeeping ----------------------------------------------------------------------

    def reap(self) -> None:
        """One reaper pass: drop dead instances, stop idle and drained ones, keep min_instances."""
        now = time.monotonic()
        crashed: list[Instance] = []
        stopping: list[Instance] = []
        over: list[Instance] = []
        unresponsive: list[Instance] = []
        with self.cond:
            if self.closed:
                return
            for inst in list(self.instances):
                if inst.state in (READY, DRAINING) and inst.exit_code() is not None:
                    self.instances.remove(inst)
                    inst.state = DEAD
                    inst.inflight = 0
                    oom = inst.confinement is not None and inst.confinement.oom_killed()
                    inst.end_reason = "out_of_memory" if oom else "crashed"
                    self._remember_end(inst.id, inst.end_reason)
                    crashed.append(inst)
                elif inst.unhealthy and inst.inflight == 0:
                    unresponsive.append(inst)
                elif (
                    inst.state in _ALIVE
                    and inst.confinement is not None
                    and inst.proc is not None
                    and inst.confinement.over_limit(inst.proc.pid)
                ):
                    over.append(inst)
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
                    if i.state == READY and not i.spare and i.inflight == 0 and now - i.last_used_mono >= keep_alive(i)
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
            keep = self.spec.prewarm
            for inst in sorted(self.instances, key=lambda i: i.started_mono, reverse=True):
                # spares of an old spec are replaced; beyond a smaller pool size, the oldest go
                if inst.spare and inst.state == READY:
                    if inst.generation == self.generation and keep > 0:
                        keep -= 1
                        continue
                    self.instances.remove(inst)
                    inst.state = STOPPED
                    self._remember_end(inst.id, "was stopped (spare no longer needed)")
                    stopping.append(inst)
            current = sum(
                1
                for i in self.instances
                if i.state in (STARTING, READY) and not i.spare and i.generation == self.generation
            )
            while (
                current < self.spec.min_instances
                and now >= self._next_min_start
                and self._alive_count() < self.spec.max_instances
            ):
                self._begin_start()
                current += 1
            spares = sum(
                1
                for i in self.instances
                if i.spare and i.state in (STARTING, READY) and i.generation == self.generation
            )
            while spares < self.spec.prewarm and now >= max(self._next_min_start, self._refill_at):
                self._begin_start(spare=True)  # the warm pool refills in the background
                spares += 1
            if self.spec.fork_template and self._template is None:
                self._template_for_start()
            retired = None
            if not self.spec.fork_template and self._template is not None:
                retired, self._template = self._template, None
            template = self._template
            if crashed or stopping:
                self.cond.notify_all()
        idle_starter = self._template_thread is None or not self._template_thread.is_alive()
        if template is not None and idle_starter and template.pid() is None and template.retry_due():
            # start (or restart) it before an instance needs it
            self._template_thread = threading.Thread(
                target=_quietly, args=(template.ensure,), name="veil-template-start", daemon=True
            )
            self._template_thread.start()
        if retired is not None:  # the function no longer forks: its template goes
            retired.close()
            self.metrics.instance_ended(f"{self.name}-template", time.monotonic())
        for inst in over:
            self._kill(inst, "out_of_memory", "out_of_memory")
        for inst in unresponsive:
            self._kill(inst, "unresponsive", "was unresponsive")
        for inst in crashed:
            log.warning(
                "function %r: instance %s exited on its own (code %s); removed", self.name, inst.id, inst.exit_code()
            )
            inst.terminate(grace=0.2)
            self.metrics.instance_ended(inst.id, time.monotonic(), crashed=True, reason=inst.end_reason or "crashed")
            self._release_confinement(inst)
        for inst in stopping:
            self._terminate(inst)

    def _terminate(self, inst: Instance) -> None:
        inst.terminate()
        self.metrics.instance_ended(inst.id, time.monotonic())
        self._release_confinement(inst)
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
        with self.cond:
            template, self._template = self._template, None
        if template is not None:
            template.close()
            self.metrics.instance_ended(f"{self.name}-template", time.monotonic())

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


def _process_stopped(pid: int | None) -> bool:
    """Whether `pid` is stopped (SIGSTOP, a debugger): it answers nothing until continued."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _answers_health(port: int, timeout: float) -> bool:
    """`GET /healthz` on a fresh connection gets an HTTP answer within `timeout`. Any status
    will do: the OpenWhisk action protocol has no health route (Veil's runtime answers 200, other
    actions may answer 404 or 501), and what is probed is that the process still serves (its
    request threads may all be busy; a new connection gets a thread of its own)."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def _quietly(fn: Callable[[], object]) -> None:
    with contextlib.suppress(PlatformError):
        fn()
