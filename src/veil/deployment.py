"""The embedded default deployment: everything of Veil on one machine, for `veil up`, `veil demo`
and the end-to-end tests.

- the KeyService runs as its own subprocess (its SQLite database under `cloud/keyservice`);
- the local platform starts runtime instances as subprocesses on loopback ports, or, with
  `platform="ray"` (`veil up --platform ray`), the TEE runtime runs as a Ray Serve application
  on the Ray cluster at `ray_address` (none given: a one-node Ray head on loopback, 127.0.0.2,
  started and stopped by this deployment; see `veil.platform.ray_serve.launch`), placed by
  Veil's packing policy as Serve's request router (`packer_policy="veil"`) or by Serve's own
  multiplex router (`"platform"`). HE functions stay on the local platform: their evaluation
  keys and compiled models live in this node's store directory;
- the gateway (with the packer or a direct router) is served by uvicorn in this process;
- the model store is the directory `cloud/store` (ciphertext only), read by runtimes directly, or
  served by `veil store serve` (`serve_store=True`) so that runtimes on other nodes read it too, or
  any existing store (`store=`: a directory or a store service's URL).

For more than one node the KeyService and the store service bind an address other nodes reach
(`keyservice_host`, `store_host`) and are given to runtimes by the URL those nodes use
(`keyservice_url`, `store_url`). Plain HTTP between nodes is safe for keys because runtimes and
clients verify the KeyService's attestation and signed answers (TLS in front is still advisable,
docs/platform.md), and the store holds only ciphertext.

Simulated attestation is switched on explicitly here (there is no TEE on a laptop) and logged
loudly by the KeyService and every runtime; a node other than this one needs the deployment's
simulation root installed (`veil cluster join`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from veil.attest.measurement import measure
from veil.attest.sim import SimRoot
from veil.sdk import Deployment
from veil.store import ModelStore
from veil.store.client import open_store
from veil.trust import TrustAnchors

log = logging.getLogger("veil.deployment")
TEE_FUNCTION = "veil-tee"
HE_FUNCTION = "veil-he"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUse(RuntimeError):
    """A port this deployment was told to use is already taken (by another deployment, say)."""


def claim_port(port: int, what: str) -> int:
    """`port` if nothing listens on it on loopback (0: a free one); else PortInUse naming it.

    Checked before starting, because a health check on a taken port would be answered by
    whoever holds it, and clients would then talk to someone else's services."""
    if port == 0:
        return free_port()
    with socket.socket() as s:
        # as the servers themselves do: connections in TIME_WAIT do not hold the port, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise PortInUse(f"{what} port {port} is already in use on 127.0.0.1 (another deployment?)") from None
    return port


def check_own_keyservice(url: str, sim_root: SimRoot, measurement: str) -> None:
    """Verify that the KeyService answering at `url` is the one this deployment started: its
    evidence must be signed by this deployment's simulation root for this code's measurement,
    over a fresh nonce. (A liveness check alone would be answered by any KeyService.)"""
    from veil.attest.evidence import Evidence
    from veil.attest.validate import Policy, validate
    from veil.attest.verify import TrustConfig, verify
    from veil.crypto.encoding import b64d, b64e
    from veil.keyservice import wire

    nonce = os.urandom(32)
    body = httpx.get(f"{url}/v1/evidence", params={"nonce": b64e(nonce)}, timeout=10).json()
    public_key, signing_key = b64d(body["public_key"], "public_key"), b64d(body["signing_key"], "signing_key")
    report = verify(Evidence.from_json(body["evidence"]), TrustConfig(sim_roots=[sim_root.public_key]))
    policy = Policy(allowed_measurements=frozenset({measurement}), allow_simulated=True)
    validate(report, policy, wire.keyservice_binding(public_key, signing_key, nonce))


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class StackOptions:
    gateway_port: int = 0
    keyservice_port: int = 0
    packer_policy: str | None = "veil"
    memory_mb: int = 512
    concurrency: int = 4
    max_instances: int = 4
    max_queue: int = 64  # requests a function queues for a slot; beyond that a clean `busy`
    idle_timeout_s: float = 120.0
    # the TEE function's warm pool (local platform): spares started, attested and idle until a
    # cold start takes one (billed apart), forked from a pre-imported template (docs/operations.md)
    prewarm: int = 0
    fork_template: bool = False
    # how memory_mb is enforced on the local platform: "auto" (a cgroup if the machine allows
    # one, else an RSS watchdog), "cgroup", "watchdog" or "off"
    memory_enforcement: str = "auto"
    he: bool = True
    runtime_init: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, str] = field(default_factory=dict)
    # where the KeyService listens, and the URL runtimes and the gateway are given for it
    keyservice_host: str = "127.0.0.1"
    keyservice_url: str | None = None
    # the model store: None = this deployment's directory cloud/store, read directly by runtimes;
    # or a directory or the http(s):// URL of a running `veil store serve` to use instead
    store: str | None = None
    # serve cloud/store with `veil store serve` on store_host:store_port, advertised as store_url
    serve_store: bool = False
    store_host: str = "127.0.0.1"
    store_port: int = 0
    store_url: str | None = None
    # where the TEE runtime runs: "local" (subprocesses of this process) or "ray" (Ray Serve)
    platform: str = "local"
    # ray: the cluster's head (HOST:PORT or "auto"); None = start a one-node head on loopback
    ray_address: str | None = None
    # ray: this driver's node IP (with no address, the head's: default 127.0.0.2)
    ray_node_ip: str | None = None
    # ray: a veil.platform.ray_serve.RayOptions (None: defaults, runtime logs under cloud/logs)
    ray_options: Any = None
    # ray: put before function names to make Serve application names (shared clusters)
    ray_app_prefix: str = ""

    def validate(self) -> None:
        """Refuse combinations that cannot work, before anything starts."""
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform: must be one of {', '.join(PLATFORMS)}, not {self.platform!r}")
        if self.platform == "local" and self.packer_policy == "platform":
            raise ValueError("packer_policy 'platform' (the platform's own router) needs platform='ray'")
        if self.platform == "local" and (self.ray_address or self.ray_node_ip):
            raise ValueError("ray_address and ray_node_ip need platform='ray'")
        if self.platform == "ray" and self.packer_policy not in (None, *RAY_POLICIES):
            raise ValueError(
                f"packer_policy {self.packer_policy!r} cannot route on Ray: choose 'veil' (Veil's router) "
                "or 'platform' (Ray Serve's default multiplex router)"
            )


PLATFORMS = ("local", "ray")
RAY_POLICIES = ("veil", "platform")


def advertised_url(host: str, port: int, given: str | None, what: str) -> str:
    """The URL other processes use for a service bound to host:port. A wildcard bind (0.0.0.0,
    ::) names no address anyone can connect to, so it needs the URL given explicitly."""
    if given:
        return given.rstrip("/")
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        raise ValueError(f"{what} binds {host}, which is no address to connect to: give its advertised URL too")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _packer_class() -> Any:
    try:
        from veil.packer import Packer
    except ImportError:
        log.warning("veil.packer.Packer unavailable: routing every model through one platform function")
        return None
    return Packer


class LocalDeployment:
    """Start with `start()` (or `with LocalDeployment(root) as d:`), stop with `stop()`."""

    def __init__(self, root: Path, options: StackOptions | None = None) -> None:
        self.root = Path(root).resolve()
        self.options = options or StackOptions()
        self.cloud = self.root / "cloud"
        self.keyservice_dir = self.cloud / "keyservice"
        self.store_dir = self.cloud / "store"
        self.log_dir = self.cloud / "logs"
        self._keyservice: subprocess.Popen | None = None
        self._store_service: subprocess.Popen | None = None
        self._store_token: str | None = None
        self.store_location = str(self.store_dir)
        self._gateway_server: Any = None
        self._gateway_thread: threading.Thread | None = None
        self.platform: Any = None
        self.he_platform: Any = None
        self.ray_address: str | None = None
        self.router: Any = None
        self.info: Deployment | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Deployment:
        self.options.validate()
        for d in (self.keyservice_dir, self.store_dir / "models", self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        sim_root = SimRoot.load_or_create(self.keyservice_dir / "sim-root.key")
        ks_port = claim_port(self.options.keyservice_port, "KeyService")
        if self.options.gateway_port:
            claim_port(self.options.gateway_port, "gateway")
        o = self.options
        ks_url = self._keyservice_url = advertised_url(o.keyservice_host, ks_port, o.keyservice_url, "the KeyService")
        self._keyservice_port = ks_port
        self._keyservice = self._spawn_keyservice()
        try:
            wait_http(f"{ks_url}/healthz", 30, self._keyservice)
            check_own_keyservice(ks_url, sim_root, measure("keyservice"))
            self.store_location = self._start_store()
            self._start_platform(ks_url)
            gw_url = self._start_gateway()
        except BaseException:
            self.stop()
            raise
        extra = {"store_dir": str(self.store_dir), "store": self.store_location, "platform": self.platform.kind}
        if self.platform.kind == "ray":
            extra["ray_address"] = self.ray_address
        self.info = Deployment(gateway_url=gw_url, keyservice_url=ks_url, extra=extra)
        self.sim_root_public_key = sim_root.public_key
        (self.root / "deployment.json").write_text(json.dumps(self.info.to_json(), indent=2))
        return self.info

    # -- the KeyService process (also killed and restarted by the chaos soak) --------------------
    def _spawn_keyservice(self) -> subprocess.Popen:
        """The KeyService subprocess on this deployment's port and state directory."""
        o = self.options
        ks_log = (self.log_dir / "keyservice.log").open("ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "veil.keyservice", "--allow-simulated"]
                + ["--state-dir", str(self.keyservice_dir), "--host", o.keyservice_host]
                + ["--port", str(self._keyservice_port)],
                stdout=ks_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            ks_log.close()

    def kill_keyservice(self) -> int:
        """`kill -9` the KeyService (its whole process group) and reap it; returns its old pid."""
        proc = self._keyservice
        if proc is None:
            raise RuntimeError("the KeyService was never started")
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
        return proc.pid

    def restart_keyservice(self, *, kill: bool = True, timeout: float = 30.0) -> subprocess.Popen:
        """Start the KeyService again on the same port and state directory (after `kill -9` of
        the running one when `kill`), wait until it answers, and check that the KeyService now
        answering is this deployment's own (`check_own_keyservice`), not whatever took the port."""
        if kill:
            self.kill_keyservice()
        elif self._keyservice is not None and self._keyservice.poll() is None:
            raise RuntimeError("the KeyService is still running: restart it with kill=True")
        self._keyservice = self._spawn_keyservice()
        wait_http(f"{self._keyservice_url}/healthz", timeout, self._keyservice)
        sim_root = SimRoot.load_or_create(self.keyservice_dir / "sim-root.key")
        check_own_keyservice(self._keyservice_url, sim_root, measure("keyservice"))
        return self._keyservice

    def local_trust_anchors(self) -> TrustAnchors:
        """The trust anchors of a developer who runs this very code on this machine and accepts its
        simulated TEE: the measurements of the installed KeyService and runtime, simulation on,
        this deployment's simulation root. A principal chooses to adopt them (`veil trust init`,
        `veil demo`); no client ever reads them from the operator's deployment.json."""
        return TrustAnchors(
            keyservice_measurements=[measure("keyservice")],
            runtime_measurements=[measure("runtime")],
            allow_simulated=True,
            sim_roots=[SimRoot.load_or_create(self.keyservice_dir / "sim-root.key").public_key],
        )

    def _start_store(self) -> str:
        """Where runtimes read sealed models: the options' store, this deployment's directory, or
        the `veil store serve` started here over that directory (with a write token only this
        deployment's gateway holds)."""
        o = self.options
        if o.store is not None:
            if o.serve_store:
                raise ValueError("give either store= (an existing store) or serve_store=True, not both")
            return o.store
        if not o.serve_store:
            return str(self.store_dir)
        port = claim_port(o.store_port, "model store")
        url = advertised_url(o.store_host, port, o.store_url, "the model store service")
        token_file = self.cloud / "store-token"
        if not token_file.exists():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        self._store_token = token_file.read_text().strip()
        store_log = (self.log_dir / "store.log").open("ab")
        self._store_service = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", "store", "serve", "--root", str(self.store_dir)]
            + ["--host", o.store_host, "--port", str(port), "--write-token-file", str(token_file)],
            stdout=store_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        store_log.close()
        wait_http(f"{url}/healthz", 30, self._store_service)
        return url

    def model_store(self) -> ModelStore:
        """The store as the gateway writes it (this deployment's directory unless told otherwise)."""
        if self.options.store is None and not self.options.serve_store:
            return open_store(self.store_dir, create=True)
        return open_store(self.store_location, token=self._store_token)

    def _start_platform(self, ks_url: str) -> None:
        from veil.gateway.routing import DirectRouter
        from veil.platform.local import FunctionSpec, LocalPlatform

        o = self.options
        self.platform = self._open_platform()
        self.he_platform = self.platform if self.platform.kind == "local" else None
        env = {
            "VEIL_SIM_ROOT": str(self.keyservice_dir / "sim-root.key"),
            "VEIL_THREADS": str(o.concurrency),
            **o.runtime_env,
        }

        def runtime_function(name: str, init_value: dict[str, Any], **pool: Any) -> FunctionSpec:
            """Both modes run the same runtime program; only the init value differs."""
            return FunctionSpec(
                **pool,
                name=name,
                command=[sys.executable, "-m", "veil.runtime"],
                memory_mb=o.memory_mb,
                concurrency=o.concurrency,
                max_instances=o.max_instances,
                max_queue=o.max_queue,
                idle_timeout_s=o.idle_timeout_s,
                env=env,
                init_value=init_value,
            )

        self.tee_spec = runtime_function(
            TEE_FUNCTION,
            {
                "kind": "tee",
                "keyservice_url": ks_url,
                "store": self.store_location,
                **o.runtime_init,
            },
            prewarm=o.prewarm,
            fork_template=o.fork_template,
        )
        packer = _packer_class() if o.packer_policy else None
        if packer is not None:
            self.router = packer(self.platform, self.tee_spec, policy=o.packer_policy)
        else:
            self.platform.deploy(self.tee_spec)
            self.router = DirectRouter(self.platform, TEE_FUNCTION)
        self.he_router = None
        if o.he:
            if self.he_platform is None:
                self.he_platform = LocalPlatform(log_dir=self.log_dir)
            # HE mode reads the same store as TEE mode (models and users' evaluation keys) and goes
            # through a packer too: routing keys carry the key id, so the instance already holding
            # a user's keys is preferred (any other fetches them from the store)
            # loaded evaluation keys are bounded by a third of the instance's memory (LRU)
            he_init = {"kind": "he", "store": self.store_location, "key_cache_mb": max(64, o.memory_mb // 3)}
            he_spec = runtime_function(HE_FUNCTION, he_init)
            if packer is not None:
                from veil.wire.he import unload_value

                # each routing key is a user's keys on an instance: the packer may drop idle ones
                # (the HE function is on the local platform: "platform", Ray's own router, means Veil's here)
                he_policy = "veil" if o.packer_policy == "platform" else o.packer_policy
                self.he_router = packer(self.he_platform, he_spec, policy=he_policy, unload_value=unload_value)
            else:
                self.he_platform.deploy(he_spec)
                self.he_router = DirectRouter(self.he_platform, HE_FUNCTION)

    def _open_platform(self) -> Any:
        """The platform the TEE runtime runs on (`StackOptions.platform`)."""
        from veil.platform.local import LocalPlatform

        o = self.options
        if o.platform == "local":
            return LocalPlatform(log_dir=self.log_dir, memory_enforcement=o.memory_enforcement)
        from veil.platform.ray_serve.launch import open_ray_platform
        from veil.platform.ray_serve.options import RayOptions

        ray_options = o.ray_options or RayOptions(log_dir=str(self.log_dir / "ray-runtimes"))
        platform = open_ray_platform(
            o.ray_address, node_ip=o.ray_node_ip, options=ray_options, app_prefix=o.ray_app_prefix
        )
        self.ray_address = platform.cluster.address if platform.cluster is not None else o.ray_address
        return platform

    def _start_gateway(self) -> str:
        import uvicorn

        from veil.gateway.app import create_app

        app = create_app(
            self.router,
            self.model_store(),
            keyservice_url=self._keyservice_url,
            he_router=self.he_router,
            platform=self.platform,
            he_platform=self.he_platform,
            he_function=HE_FUNCTION if self.he_router is not None else None,
        )
        port = claim_port(self.options.gateway_port, "gateway")
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self._gateway_server = uvicorn.Server(config)
        self._gateway_server.install_signal_handlers = lambda: None
        self._gateway_thread = threading.Thread(target=self._gateway_server.run, name="veil-gateway", daemon=True)
        self._gateway_thread.start()
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", 30)
        return url

    def stop(self) -> None:
        if self._gateway_server is not None:
            self._gateway_server.should_exit = True
            if self._gateway_thread is not None:
                self._gateway_thread.join(timeout=10)
        for router in (self.router, getattr(self, "he_router", None)):
            if router is not None and hasattr(router, "close"):
                router.close()
        if self.he_platform is not None and self.he_platform is not self.platform:
            self.he_platform.close()
        if self.platform is not None:
            self.platform.close()
        for service in (self._keyservice, self._store_service):
            if service is not None and service.poll() is None:
                service.terminate()
                try:
                    service.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(service.pid, 9)
                    service.wait()

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
