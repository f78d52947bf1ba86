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
    "--platform",
    "platform_kind",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where TEE runtimes run: subprocesses of this process, or a Ray Serve application on a Ray cluster.",
)
@click.option(
    "--address",
    "ray_address",
    help="With --platform ray: the Ray cluster's head (HOST:PORT, or 'auto'). Default: start a "
    "one-node Ray head on loopback (127.0.0.2, dashboard off) for this deployment, stopped with it.",
)
@click.option(
    "--ray-node-ip",
    help="With --platform ray: this driver's node IP (default: the head's host when it is loopback); "
    "without --address, the IP of the Ray head started here (default 127.0.0.2).",
)
@click.option(
    "--ray-cpus",
    type=float,
    default=0.25,
    show_default=True,
    help="With --platform ray: logical CPUs Ray reserves per replica (fractional: a replica mostly "
    "waits on its runtime).",
)
@click.option(
    "--ray-resource",
    "ray_resources",
    multiple=True,
    metavar="NAME=AMOUNT",
    help="With --platform ray: a custom Ray resource every replica needs, e.g. tee=0.001 to pin replicas "
    "to nodes started with --resources '{\"tee\": 1}'. Repeatable.",
)
@click.option(
    "--sim-root-path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The simulation root's path on every node running runtimes (installed there with `veil cluster "
    "join`); default: this deployment's own file, right on a single machine.",
)
@click.option(
    "--policy",
    type=click.Choice(["veil", "sesemi", "per-model", "platform", "none"]),
    default="veil",
    show_default=True,
    help="Packer policy routing models to runtime instances. With --platform ray: 'veil' (Veil's policy "
    "as Ray Serve's request router) or 'platform' (Ray Serve's default multiplex router, the baseline). "
    "'none': one function, platform scheduling.",
)
@click.option("--max-instances", default=4, show_default=True, type=int)
@click.option(
    "--idle-timeout", default=120.0, show_default=True, type=float, help="Seconds before an idle instance stops."
)
@click.option(
    "--prewarm",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Spare TEE runtime instances (Ray: replicas) kept started, measured and attested but holding no "
    "model or key; a cold start takes one (off its request path) and the pool refills in the background. "
    "Their idle memory is billed apart (platform metrics: prewarm_gb_seconds).",
)
@click.option(
    "--fork-template/--no-fork-template",
    default=False,
    show_default=True,
    help="Local platform: fork TEE runtime instances from one pre-imported template process (no interpreter "
    "start-up or imports per instance); each generates its own keys and evidence after the fork.",
)
@network_options
def up(
    root: Path,
    gateway_port: int,
    keyservice_port: int,
    platform_kind: str,
    ray_address: str | None,
    ray_node_ip: str | None,
    ray_cpus: float,
    ray_resources: tuple[str, ...],
    sim_root_path: Path | None,
    policy: str,
    max_instances: int,
    idle_timeout: float,
    prewarm: int,
    fork_template: bool,
    **network: object,
) -> None:
    """Start KeyService, model store, gateway and platform; print where each listens.

    Uses simulated TEE attestation (this machine has no TEE), which every component logs.
    Then use `veil owner ...` and `veil user ...` from another terminal in the same directory.
    Multi-node (Ray): see docs/platform.md, "Multi-node walk-through".
    """
    from veil.deployment import LocalDeployment, StackOptions

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if platform_kind != "ray" and (ray_address or ray_node_ip or ray_resources):
        raise click.UsageError("--address, --ray-node-ip and --ray-resource need --platform ray")
    if platform_kind != "ray" and policy == "platform":
        raise click.UsageError("--policy platform (the platform's own router) needs --platform ray")
    if platform_kind == "ray" and fork_template:
        raise click.UsageError("--fork-template is a local-platform option (Ray starts each replica's own runtime)")
    if platform_kind == "ray" and policy in ("sesemi", "per-model"):
        raise click.UsageError(f"--policy {policy} cannot route on Ray: use 'veil' or 'platform'")
    ray_options = None
    if platform_kind == "ray":
        from veil.platform.ray_serve.options import RayOptions

        ray_options = RayOptions(
            num_cpus=ray_cpus,
            resources=_resources(ray_resources),
            log_dir=str((root / "cloud" / "logs" / "ray-runtimes").resolve()),
        )
    runtime_env = {"VEIL_SIM_ROOT": str(sim_root_path)} if sim_root_path is not None else {}
    options = StackOptions(
        gateway_port=gateway_port,
        keyservice_port=keyservice_port,
        packer_policy=None if policy == "none" else policy,
        max_instances=max_instances,
        idle_timeout_s=idle_timeout,
        prewarm=prewarm,
        fork_template=fork_template,
        keyservice_host=str(network["keyservice_host"]),
        keyservice_url=network["keyservice_url"],  # type: ignore[arg-type]
        store=network["store_location"],  # type: ignore[arg-type]
        serve_store=bool(network["serve_store"]),
        store_host=str(network["store_host"]),
        store_port=int(network["store_port"]),  # type: ignore[call-overload]
        store_url=network["store_url"],  # type: ignore[arg-type]
        platform=platform_kind,
        ray_address=ray_address,
        ray_node_ip=ray_node_ip,
        ray_options=ray_options,
        runtime_env=runtime_env,
    )
    stack = LocalDeployment(root, options)
    try:
        info = stack.start()
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"could not start: {exc}") from None
    click.echo(f"KeyService   {info.keyservice_url}")
    click.echo(f"gateway      {info.gateway_url}   (/docs, /metrics, /healthz)")
    click.echo(f"model store  {stack.store_location}")
    if platform_kind == "ray":
        owned = " (started here, stopped with it)" if ray_address is None else ""
        click.echo(f"platform     ray at {stack.ray_address}{owned}, router {policy} (simulated TEE)")
        click.echo(f"             runtime logs on each node under {ray_options.log_dir if ray_options else '-'}")
    else:
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


def _resources(pairs: tuple[str, ...]) -> dict[str, float]:
    """`NAME=AMOUNT` pairs -> Ray custom resources; a clear usage error for anything else."""
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise click.BadParameter(f"{pair!r}: expected NAME=AMOUNT with AMOUNT > 0", param_hint="--ray-resource")
        out[name] = value
    return out
