"""`veil up`: the embedded deployment in the foreground until Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click


def network_options(command: click.Command) -> click.Command:
    """Where the KeyService and the model store listen, and the URLs other nodes use for them."""
    options = [
        click.option(
            "--keyservice-host",
            default="127.0.0.1",
            show_default=True,
            help="KeyService bind address (e.g. 0.0.0.0 so runtimes on other nodes reach it).",
        ),
        click.option(
            "--keyservice-url",
            help="The KeyService URL runtimes and clients are given (needed with a wildcard bind; "
            "https://... when a TLS proxy fronts it).",
        ),
        click.option(
            "--store",
            "store_location",
            help="Use this existing model store instead of DIR/cloud/store: a directory, or the "
            "http(s):// URL of a `veil store serve`.",
        ),
        click.option(
            "--serve-store/--no-serve-store",
            default=False,
            show_default=True,
            help="Serve DIR/cloud/store with `veil store serve`, so runtimes on other nodes read it.",
        ),
        click.option("--store-host", default="127.0.0.1", show_default=True, help="Store service bind address."),
        click.option("--store-port", default=8900, show_default=True, type=int),
        click.option("--store-url", help="The store URL runtimes are given (needed with a wildcard bind)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
@network_options
def up(
    root: Path,
    gateway_port: int,
    keyservice_port: int,
    policy: str,
    max_instances: int,
    idle_timeout: float,
    **network: object,
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
        keyservice_host=str(network["keyservice_host"]),
        keyservice_url=network["keyservice_url"],  # type: ignore[arg-type]
        store=network["store_location"],  # type: ignore[arg-type]
        serve_store=bool(network["serve_store"]),
        store_host=str(network["store_host"]),
        store_port=int(network["store_port"]),  # type: ignore[call-overload]
        store_url=network["store_url"],  # type: ignore[arg-type]
    )
    stack = LocalDeployment(root, options)
    try:
        info = stack.start()
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"could not start: {exc}") from None
    click.echo(f"KeyService   {info.keyservice_url}")
    click.echo(f"gateway      {info.gateway_url}   (/docs, /metrics, /healthz)")
    click.echo(f"model store  {stack.store_location}")
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
