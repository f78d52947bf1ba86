"""A real multi-node Ray cluster on this machine, on loopback only (tests, benchmarks, demos).

Each node is a `ray start --block` process in its own session, with its own temp dir and its
node IP forced inside 127.0.0.0/8 (head 127.0.0.2, workers 127.0.0.3, ...): Ray replaces
127.0.0.1 with the host's own address, which would send cluster traffic off loopback. Ports
Ray would otherwise take from fixed defaults (client server, dashboard agent) are picked free
ones, so several clusters can run side by side; the dashboard is off.

Ray's token authentication is on, with a fresh token per cluster in `root/auth_token`
(`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`): on a shared machine any local user could
otherwise connect to the cluster and run code in it. A driver needs `driver_env()` in its
environment before `ray.init`; `connect_here()` puts it into this process's (and refreshes
Ray's cached auth settings when Ray was imported already).

`stop()` ends only what this object started: each node's process group, then any process left
of it (found by pid among the node's descendants recorded while it ran), never by name.

    with LocalRayCluster(tmp, workers=1) as cluster:
        platform = RayPlatform(address=cluster.address, node_ip=cluster.head_ip)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from veil.platform.ray_serve.workers import node_env

#: The environment of every node (and so of every Ray worker, Serve replicas included).
#: `RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0`: a replica runs its (async, non-blocking)
#: request handler on Serve's own event loop instead of handing each request to a second
#: loop on another thread, which saves a thread hop per request (about 0.5-1 ms of a warm
#: request on this machine). Set on the nodes, not per deployment: a `runtime_env` would give
#: every replica a dedicated new worker process (no pooled worker), slowing cold starts.
#: `workers.node_env()`: every worker preloads Serve's and Veil's replica modules, so a prestarted
#: idle worker takes a replica without importing them on the cold path.
NODE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **node_env()}


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ray_executable() -> str:
    """The `ray` CLI next to this interpreter (the one with Veil installed)."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


@dataclass
class _Node:
    ip: str
    head: bool
    proc: subprocess.Popen[bytes]
    log: Path
    known: dict[int, float] = field(default_factory=dict)  # descendant pid -> its create time


class LocalRayCluster:
    """Head plus `workers` worker nodes, each `num_cpus` logical CPUs (fractional replicas
    share them), all on loopback addresses."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 1,
        head_ip: str = "127.0.0.2",
        num_cpus: int = 2,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        if not head_ip.startswith("127."):
            raise ValueError("a local cluster keeps its node IPs inside 127.0.0.0/8")
        self.root = Path(root)
        self.head_ip = head_ip
        base = head_ip.rsplit(".", 1)
        self.worker_ips = [f"{base[0]}.{int(base[1]) + 1 + i}" for i in range(workers)]
        self.num_cpus = num_cpus
        self.token_path = self.root / "auth_token"
        self.env = {**os.environ, **NODE_ENV, **self.driver_env(), **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.nodes: list[_Node] = []

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def driver_env(self) -> dict[str, str]:
        """What a driver process needs in its environment to connect (token authentication)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def connect_here(self) -> dict[str, str | None]:
        """Set `driver_env()` in this process, for a `ray.init` that follows; returns the values
        it replaced (for `restore_env`). Ray caches its auth mode and token when first used, so
        a Ray imported earlier is told to read them again (as Ray's own tests do)."""
        env = self.driver_env()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _refresh_ray_auth()
        return saved

    @staticmethod
    def restore_env(saved: dict[str, str | None]) -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_ray_auth()

    def start(self) -> LocalRayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        self.port = free_port(self.head_ip)
        try:
            self._start_node(self.head_ip, head=True)
            for ip in self.worker_ips:
                self._start_node(ip, head=False)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, ip: str, *, head: bool) -> None:
        name = "head" if head else f"node-{ip.rsplit('.', 1)[1]}"
        temp = self.root / name
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [
            ray_executable(),
            "start",
            "--block",
            "--node-ip-address",
            ip,
            "--num-cpus",
            str(self.num_cpus),
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(free_port(ip)),
        ]
        if head:
            cmd += [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard=false",
                "--dashboard-port",
                str(free_port(ip)),
                "--ray-client-server-port",
                str(free_port(ip)),
            ]
        else:
            cmd += ["--address", self.address]
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        node = _Node(ip, head, proc, log)
        self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray node {ip} exited with code {proc.returncode}; see {log}")
            if b"Ray runtime started" in log.read_bytes():
                self._remember(node)
                return
            time.sleep(0.2)
        raise TimeoutError(f"ray node {ip} did not start within {self.start_timeout_s:.0f} s; see {log}")

    def _remember(self, node: _Node) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(node.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    node.known[child.pid] = child.create_time()

    def remember_processes(self) -> None:
        """Record the nodes' current descendants (workers come and go) for `stop`."""
        for node in self.nodes:
            self._remember(node)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every node (workers first): SIGTERM to its group, SIGKILL what is left."""
        self.remember_processes()
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            for pid, created in node.known.items():
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if proc.create_time() == created:  # the very process we saw, not a reused pid
                        proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5.0)
        self.nodes.clear()

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _refresh_ray_auth() -> None:
    if "ray" not in sys.modules:
        return
    with contextlib.suppress(Exception):  # Ray internals; a Ray without them reads env at init
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
