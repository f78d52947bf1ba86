"""Wiring Veil's gateway onto the Ray platform (`veil up --platform ray`, the Ray tests and
benchmark), kept apart from `veil.deployment` so the embedded default stays as it is.

Everything above the platform is unchanged on Ray: the gateway app, the packer (which, on a
platform that routes by model, hands the policy to Ray Serve's router) and the clients. Only the
`Platform` object differs. `gateway_on_platform` puts a second gateway in front of a running
local deployment's KeyService and model store, with its TEE function on another platform:

    with LocalDeployment(root) as d:
        platform = RayPlatform(address="127.0.0.2:6379", node_ip="127.0.0.2")
        gw = gateway_on_platform(d, platform)        # gw.url: the Ray-backed gateway
        ...
        gw.close(); platform.close()
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from veil.deployment import LocalDeployment, free_port, wait_http
from veil.packer import Packer
from veil.platform.protocol import Platform


@dataclass
class GatewayServer:
    """A gateway served by uvicorn on a thread of this process, on loopback."""

    url: str
    server: Any
    thread: threading.Thread
    router: Any = None

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.router is not None and hasattr(self.router, "close"):
            self.router.close()


def serve_gateway(
    router: Any,
    deployment: LocalDeployment,
    *,
    platform: Platform | None = None,
    he_router: Any = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> GatewayServer:
    """Serve the gateway app for `router` with the deployment's store and KeyService."""
    import uvicorn

    from veil.gateway.app import create_app
    from veil.store import LocalModelStore

    assert deployment.info is not None, "start the deployment first"
    app = create_app(
        router,
        LocalModelStore(deployment.store_dir),
        keyservice_url=deployment.info.keyservice_url,
        he_router=he_router,
        platform=platform,
    )
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, name="veil-gateway-ray", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    wait_http(f"{url}/healthz", 30)
    return GatewayServer(url, server, thread, router)


def gateway_on_platform(deployment: LocalDeployment, platform: Platform, *, policy: str = "veil") -> GatewayServer:
    """A gateway whose TEE function (the deployment's own spec: same runtime, KeyService, store
    and simulation root) runs on `platform`, routed by the packing `policy` ("veil", or
    "platform" for the platform's own router)."""
    packer = Packer(platform, deployment.tee_spec, policy)
    try:
        return serve_gateway(packer, deployment, platform=platform)
    except BaseException:
        packer.close()
        raise
