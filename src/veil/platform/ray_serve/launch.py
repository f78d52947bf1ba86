"""Open a `RayPlatform` the way `veil up --platform ray` asks for it.

- `address` given (`HOST:PORT` of a running cluster's head, or "auto"): connect to it as a
  driver. On a single machine the cluster's nodes sit on loopback addresses (Ray replaces
  127.0.0.1 with the host's own address, so they are 127.0.0.2, ...), and the driver must say
  it is on one of them: a loopback `HOST` is taken as the driver's node IP unless `node_ip`
  says otherwise. A cluster started with token authentication needs `RAY_AUTH_MODE=token` and
  `RAY_AUTH_TOKEN_PATH` in this process's environment, as for any Ray driver.
- no address: start a one-node Ray cluster on loopback for this deployment alone
  (`LocalRayCluster`: head on `node_ip`, default 127.0.0.2, dashboard off, token
  authentication, this machine's CPUs), owned by the platform: `platform.close()` stops it
  and removes its temp dir. Ray's temp dir is a short one under the system temp dir, since
  Ray's socket paths must fit in 107 bytes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from veil.platform.ray_serve.options import RayOptions

DEFAULT_HEAD_IP = "127.0.0.2"


def driver_node_ip(address: str, node_ip: str | None) -> str | None:
    """The node IP this driver gives Ray: `node_ip`, else the head's host if it is loopback
    (the driver then runs on the head's machine), else None (Ray picks)."""
    if node_ip is not None:
        return node_ip
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def open_ray_platform(
    address: str | None,
    *,
    node_ip: str | None = None,
    options: RayOptions | None = None,
    app_prefix: str = "",
    num_cpus: int | None = None,
) -> Any:
    """A connected `RayPlatform` (see the module docstring); the caller closes it."""
    from veil.platform.ray_serve import _require_ray

    _require_ray()
    from veil.platform.ray_serve.cluster import LocalRayCluster
    from veil.platform.ray_serve.platform import RayPlatform

    if address is not None:
        return RayPlatform(
            address=address, node_ip=driver_node_ip(address, node_ip), options=options, app_prefix=app_prefix
        )
    head_ip = node_ip or DEFAULT_HEAD_IP
    root = Path(tempfile.mkdtemp(prefix="veil-ray-"))
    cluster = LocalRayCluster(root, workers=0, head_ip=head_ip, num_cpus=num_cpus or os.cpu_count() or 2)
    saved: dict[str, str | None] = {}

    def stop() -> None:
        cluster.stop()
        cluster.restore_env(saved)
        shutil.rmtree(root, ignore_errors=True)

    try:
        cluster.start()
        saved = cluster.connect_here()
        platform = RayPlatform(address=cluster.address, node_ip=head_ip, options=options, app_prefix=app_prefix)
    except BaseException:
        stop()
        raise
    platform.cluster = cluster  # for operators and tests: the address and nodes of the owned cluster
    platform.on_close(stop)
    return platform
