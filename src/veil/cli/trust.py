"""`veil trust ...`: a principal's own trust anchors, kept in its client directory.

What an owner or user trusts (the KeyService measurement, the runtime measurements their keys
may reach, whether simulated attestation is acceptable and from which root) is theirs to set;
the operator's deployment.json only says where things listen.
"""

from __future__ import annotations

from pathlib import Path

import click

from veil.cli._client import client_dir_option


def _sim_root_public_key(value: str) -> bytes:
    """A simulation root given as a hex public key, or as the path of the root's key file."""
    path = Path(value)
    if path.exists():
        from veil.attest.sim import SimRoot

        return SimRoot.load_or_create(path).public_key
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise click.BadParameter("a 64-hex-digit public key or an existing key file", param_hint="--sim-root") from None
    if len(raw) != 32:
        raise click.BadParameter("an Ed25519 public key is 32 bytes (64 hex digits)", param_hint="--sim-root")
    return raw


@click.group("trust")
def trust() -> None:
    """Your trust anchors: which KeyService and runtimes you trust, and whether simulation."""


@trust.command("init")
@click.option(
    "--keyservice-measurement",
    "ks_measurements",
    multiple=True,
    help="KeyService measurement you expect (repeatable; default: `veil measure --component keyservice` "
    "of the code installed here).",
)
@click.option(
    "--runtime-measurement",
    "rt_measurements",
    multiple=True,
    help="Runtime measurement your keys may reach (repeatable; default: this installation's runtime).",
)
@click.option(
    "--allow-simulated/--no-allow-simulated",
    default=False,
    show_default=True,
    help="Accept simulated TEE attestation (development only).",
)
@click.option(
    "--sim-root",
    "sim_roots",
    multiple=True,
    help="Simulation root to trust: hex public key or the root's key file (needs --allow-simulated).",
)
@click.option("--force", is_flag=True, help="Replace existing trust anchors.")
@client_dir_option
def init(
    ks_measurements: tuple[str, ...],
    rt_measurements: tuple[str, ...],
    allow_simulated: bool,
    sim_roots: tuple[str, ...],
    force: bool,
    client_dir: Path,
) -> None:
    """Write your trust anchors to CLIENT_DIR/trust.json (mode 0600)."""
    from veil.attest.measurement import measure
    from veil.trust import FILE_NAME, TrustAnchors, TrustError

    path = client_dir / FILE_NAME
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists: pass --force to replace your trust anchors")
    if sim_roots and not allow_simulated:
        raise click.BadParameter("--sim-root needs --allow-simulated", param_hint="--sim-root")
    try:
        anchors = TrustAnchors(
            keyservice_measurements=list(ks_measurements) or [measure("keyservice")],
            runtime_measurements=list(rt_measurements) or [measure("runtime")],
            allow_simulated=allow_simulated,
            sim_roots=[_sim_root_public_key(r) for r in sim_roots],
        )
    except TrustError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    anchors.save(client_dir)
    click.echo(f"trust anchors written to {path}")
    click.echo(f"  KeyService  {', '.join(m[:16] + '…' for m in anchors.keyservice_measurements)}")
    click.echo(f"  runtime     {', '.join(m[:16] + '…' for m in anchors.runtime_measurements)}")
    click.echo(f"  simulation  {'ALLOWED (development only)' if allow_simulated else 'refused'}")


@trust.command("show")
@client_dir_option
def show(client_dir: Path) -> None:
    """Print your trust anchors."""
    import json

    from veil.trust import TrustAnchors, TrustError

    try:
        click.echo(json.dumps(TrustAnchors.load(client_dir).to_json(), indent=2))
    except TrustError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
