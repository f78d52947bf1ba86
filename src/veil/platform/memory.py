"""Memory limits that hold: an instance over its function's `memory_mb` is stopped.

A function's `memory_mb` is what it is billed for and what the packer plans with; without
enforcement a runtime that loads too much simply keeps growing (an instance declared 512 MB was
seen at 1,345 MiB). Each instance gets a `Confinement` from the platform's `MemoryEnforcer`,
chosen once per platform, best first:

- **cgroup v2**: a child cgroup per instance (`memory.max`, `memory.swap.max = 0`) under a
  cgroup of this platform, inside the cgroup this process runs in; needs the memory controller
  delegated there (`cgroup.controllers` lists `memory` and `+memory` can be written to
  `cgroup.subtree_control`). The kernel's OOM killer stops the instance the moment it goes
  over, and `memory.events` counts the `oom_kill`.
- **cgroup v1**: the same under the v1 memory hierarchy (`memory.limit_in_bytes`, and
  `memory.memsw.limit_in_bytes` so swap does not stretch the limit; `memory.oom_control`'s
  `oom_kill` count says the kernel killed it). Hybrid hosts (v2 mounted without the memory
  controller, as on this project's machines) have this one.
- **watchdog**: where no cgroup can be created (no permission, no controller), the platform's
  reaper samples each instance's resident set every reap interval and kills it (SIGKILL) when it
  is over. Coarser: an allocation spike shorter than the interval goes unseen.

`kind` of the enforcer is reported in the platform's metrics, so an operator knows which holds.
The limit is the instance's, not the host's: the kernel also counts page cache in a cgroup,
which it reclaims before it kills anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

log = logging.getLogger("veil.platform.memory")

CGROUP_ROOT = Path("/sys/fs/cgroup")


class Confinement(Protocol):
    """The memory limit of one instance."""

    def attach(self, pid: int) -> None:
        """Put process `pid` (just spawned) under the limit; its later children follow."""
        ...

    def over_limit(self, pid: int) -> bool:
        """True when a watchdog must kill `pid` now (a cgroup's kernel does it itself: False)."""
        ...

    def oom_killed(self) -> bool:
        """Whether the instance was stopped for going over its limit."""
        ...

    def peak_bytes(self) -> int | None:
        """The most memory the instance held (None if unknown)."""
        ...

    def close(self) -> None:
        """Remove what the limit needed (the instance is gone). Idempotent."""
        ...


class MemoryEnforcer(Protocol):
    kind: str

    def confine(self, instance_id: str, limit_bytes: int) -> Confinement: ...

    def close(self) -> None: ...


# -- the watchdog ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set of `pid` from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _WatchedLimit:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.killed = False
        self.peak = 0

    def attach(self, pid: int) -> None:
        return None

    def over_limit(self, pid: int) -> bool:
        rss = rss_bytes(pid)
        if rss is None:
            return False
        self.peak = max(self.peak, rss)
        if rss > self.limit:
            self.killed = True
            return True
        return False

    def oom_killed(self) -> bool:
        return self.killed

    def peak_bytes(self) -> int | None:
        return self.peak or None

    def close(self) -> None:
        return None


class WatchdogEnforcer:
    """RSS sampled by the reaper; over the limit is SIGKILL (see the module docstring)."""

    kind = "watchdog"

    def confine(self, instance_id: str, limit_bytes: int) -> Confinement:
        return _WatchedLimit(limit_bytes)

    def close(self) -> None:
        return None


# -- cgroups -----------------------------------------------------------------------------------


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _keyed(path: Path, key: str) -> int:
    """The value of `key` in a flat keyed file (memory.events, memory.oom_control)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


class _CgroupLimit:
    def __init__(self, directory: Path, v2: bool) -> None:
        self.dir = directory
        self.v2 = v2

    def attach(self, pid: int) -> None:
        _write(self.dir / "cgroup.procs", str(pid))

    def over_limit(self, pid: int) -> bool:
        return False  # the kernel enforces it

    def oom_killed(self) -> bool:
        if self.v2:
            return _keyed(self.dir / "memory.events", "oom_kill") > 0
        return _keyed(self.dir / "memory.oom_control", "oom_kill") > 0

    def peak_bytes(self) -> int | None:
        return _read_int(self.dir / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # fails while a process is still in it; the platform's close retries


class CgroupEnforcer:
    """One cgroup for this platform, one child per instance (v1 or v2 memory controller)."""

    def __init__(self, parent: Path, v2: bool) -> None:
        self.parent = parent
        self.v2 = v2
        self.kind = "cgroup-v2" if v2 else "cgroup-v1"
        self._children: list[_CgroupLimit] = []

    @classmethod
    def create(cls, base: Path, v2: bool) -> CgroupEnforcer:
        """A platform cgroup under `base` (this process's own cgroup), proven to work: a probe
        child takes a limit. Raises OSError where the machine does not allow it."""
        _sweep_stale(base)
        parent = base / f"veil-platform-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        parent.mkdir()
        try:
            if v2:
                _write(parent / "cgroup.subtree_control", "+memory")
            enforcer = cls(parent, v2)
            probe = enforcer._make("probe", 64 << 20)
            probe.close()
            enforcer._children.remove(probe)
            return enforcer
        except OSError:
            with contextlib.suppress(OSError):
                for child in parent.iterdir():
                    if child.is_dir():
                        child.rmdir()
                parent.rmdir()
            raise

    def _make(self, name: str, limit_bytes: int) -> _CgroupLimit:
        d = self.parent / name
        d.mkdir(exist_ok=True)
        if self.v2:
            _write(d / "memory.max", str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to stretch
                _write(d / "memory.swap.max", "0")
        else:
            _write(d / "memory.limit_in_bytes", str(limit_bytes))
            with contextlib.suppress(OSError):  # memsw is absent without swap accounting
                _write(d / "memory.memsw.limit_in_bytes", str(limit_bytes))
            with contextlib.suppress(OSError):
                _write(d / "memory.swappiness", "0")
        limit = _CgroupLimit(d, self.v2)
        self._children.append(limit)
        return limit

    def confine(self, instance_id: str, limit_bytes: int) -> Confinement:
        return self._make(instance_id, limit_bytes)

    def close(self) -> None:
        """Remove the instances' cgroups and this platform's. An instance's cgroup can be removed
        only once the kernel has taken its last task out, a moment after the process died."""
        deadline = time.monotonic() + 2.0
        while True:
            _remove_tree(self.parent)
            if not self.parent.exists() or time.monotonic() > deadline:
                return
            time.sleep(0.05)


def _remove_tree(parent: Path) -> None:
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        parent.rmdir()


def _sweep_stale(base: Path) -> None:
    """Remove the cgroups of platforms whose process is gone (killed before it could clean up)."""
    with contextlib.suppress(OSError):
        for d in base.glob("veil-platform-*"):
            pid = d.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                _remove_tree(d)


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path in the v1 hierarchy of `controller`, or in v2 (None)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller is None and names == "":
            return path
        if controller is not None and controller in names.split(","):
            return path
    return None


def _mounts(fstype: str) -> list[tuple[Path, set[str]]]:
    out = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] == fstype:
                out.append((Path(parts[1]), set(parts[3].split(","))))
    except OSError:
        pass
    return out


def detect(prefer: str = "auto") -> MemoryEnforcer | None:
    """The best enforcer this machine allows (`prefer`: "auto", "cgroup", "watchdog" or "off";
    "off" gives None: memory is only billed)."""
    if prefer == "off":
        return None
    if prefer in ("auto", "cgroup"):
        own2 = _own_cgroup(None)
        for mount, _ in _mounts("cgroup2"):
            if own2 is None:
                break
            base = mount / own2.lstrip("/")
            try:
                if "memory" in (base / "cgroup.controllers").read_text().split():
                    return CgroupEnforcer.create(base, v2=True)
            except OSError as e:
                log.debug("cgroup v2 at %s not usable: %s", base, e)
        own1 = _own_cgroup("memory")
        for mount, opts in _mounts("cgroup"):
            if "memory" not in opts or own1 is None:
                continue
            base = mount / own1.lstrip("/")
            try:
                return CgroupEnforcer.create(base, v2=False)
            except OSError as e:
                log.debug("cgroup v1 at %s not usable: %s", base, e)
        if prefer == "cgroup":
            log.warning("no usable memory cgroup on this machine: memory limits enforced by an RSS watchdog")
    return WatchdogEnforcer()
