"""Tie a child process's life to ours: the kernel kills it when this process dies.

A Ray Serve replica is a Ray worker process that can vanish with `kill -9` (node loss, OOM
killer, `ray stop`); nothing of Python runs then, so no finalizer can stop the runtime
subprocess it owns, which would stay alive and keep listening. Linux's
`prctl(PR_SET_PDEATHSIG, SIGKILL)`, set in the child between fork and exec, makes the kernel
send SIGKILL to the child when its parent dies.

The death signal fires when the *thread* that forked the child exits, not only the process,
so every such child is forked from one long-lived daemon thread (`spawn_tied`); a short-lived
worker thread that forked a runtime would otherwise take the runtime with it when it ends.
If the parent died between fork and prctl, the child sees a different parent pid and exits.
On systems without prctl (not Linux) the children are simply not tied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


# Resolved once, before any fork: the child must not import or allocate between fork and exec.
_PRCTL = _load_prctl()


def supported() -> bool:
    """Whether children can be tied to this process (Linux prctl available)."""
    return _PRCTL is not None


def die_with_parent_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A `preexec_fn` that asks for SIGKILL when `parent_pid` (this process) dies."""
    prctl = _PRCTL
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the death signal was armed
            os._exit(1)

    return preexec


class _Spawner:
    """One daemon thread that runs every tied fork, for as long as the process lives."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="veil-lifeline-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, never kills the spawner
                fut.set_exception(e)

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future[object] = Future()
        self._jobs.put((fn, fut))
        return fut.result()  # type: ignore[return-value]


_spawner: _Spawner | None = None
_spawner_pid = 0
_spawner_lock = threading.Lock()


def spawn_tied(fn: Callable[[], T]) -> T:
    """Run `fn` (which forks a tied child, e.g. `Popen(..., preexec_fn=die_with_parent_preexec(...))`)
    on the process's long-lived spawner thread and return its result."""
    global _spawner, _spawner_pid
    with _spawner_lock:
        if _spawner is None or _spawner_pid != os.getpid():  # a forked process needs its own thread
            _spawner, _spawner_pid = _Spawner(), os.getpid()
        spawner = _spawner
    return spawner.run(fn)
