"""`veil up`: the embedded deployment in the foreground until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click


@click.command("up")
@click.option(
    "--dir",
    "root",
    type=click.Path(path_type=Path),
    default=Path(".veil"),
    show_default=True,
    help="State directory: cloud/ (store, KeyService, logs) and deployment.json.",
)
@click.option("--gateway-port", default=8600, show_default=True, type=int)
@click.option("--keyservice-port", default=8700, show_default=True, type=int)
@click.option(
    "--policy",
    type=click.Choice(["veil", "sesemi", "per-model", "none"]),
    default="veil",
    show_default=True,
    help="Packer policy routing models to runtime instances ('none': one function, platform scheduling).",
)
@click.option("--max-instances", default=4, show_default=True, type=int)
@click.option(
    "--idle-timeout", default=120.0, show_default=True, type=float, help="Seconds before an idle instance stops."
)
def up(
    root: Path, gateway_port: int, keyservice_port: int, policy: str, max_instances: int, idle_timeout: float
) -> None:
    """Start KeyService, model store, gateway and local platform; print where each listens.

    Uses simulated TEE attestation (this machine has no TEE), which every component logs.
    Then use `veil owner ...` and `veil user ...` from another terminal in the same directory.
    """
    from veil.deployment import LocalDeployment, StackOptions

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = StackOptions(
        gateway_port=gateway_port,
        keyservice_port=keyservice_port,
        packer_policy=None if policy == "none" else policy,
        max_instances=max_instances,
        idle_timeout_s=idle_timeout,
    )
    stack = LocalDeployment(root, options)
    try:
        info = stack.start()
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"could not start: {exc}") from None
    click.echo(f"KeyService   {info.keyservice_url}")
    click.echo(f"gateway      {info.gateway_url}   (/docs, /metrics, /healthz)")
    click.echo(f"model store  {stack.store_dir}")
    click.echo(f"platform     local (simulated TEE), logs in {stack.log_dir}")
    click.echo(f"deployment   {root / 'deployment.json'} (addresses only)  — Ctrl-C to stop")
    click.echo(
        "clients: set your own trust anchors once, e.g. "
        f"`veil trust init --allow-simulated --sim-root {stack.keyservice_dir / 'sim-root.key'}`"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
