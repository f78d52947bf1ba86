"""`veil keyservice ...`: serve the KeyService, print and verify its audit log."""

from __future__ import annotations

import json
from pathlib import Path

import click

DEFAULT_STATE = Path(".veil/cloud/keyservice")


@click.group("keyservice")
def keyservice() -> None:
    """Run and inspect the KeyService (principals, sealed keys, policy, key release)."""


@keyservice.command("serve")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="Directory of the SQLite database (and the simulated TEE root when simulating).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8700, show_default=True, type=int)
@click.option(
    "--allow-simulated/--no-allow-simulated",
    default=False,
    show_default=True,
    help="Accept simulated runtime attestation. Development only: never in production.",
)
@click.option(
    "--durability",
    type=click.Choice(["normal", "full"]),
    default="normal",
    show_default=True,
    help="normal: survives process crashes; full: also fsyncs every commit (power loss).",
)
def serve(state_dir: Path, host: str, port: int, allow_simulated: bool, durability: str) -> None:
    """Start the KeyService HTTP API. State survives restarts.

    This process becomes `python -m veil.keyservice` (exec), so only the KeyService's measured
    code runs in it, not this command line."""
    import os
    import sys

    argv = [sys.executable, "-m", "veil.keyservice", "--state-dir", str(state_dir), "--host", host]
    argv += ["--port", str(port), "--durability", durability] + (["--allow-simulated"] if allow_simulated else [])
    os.execv(sys.executable, argv)  # noqa: S606 - a fixed argv, no shell


def _open_store(state_dir: Path, measurement: str | None):
    from veil.attest.measurement import measure
    from veil.attest.sim import SimRoot
    from veil.keyservice.server import open_store, sim_root_path

    root_file = sim_root_path(state_dir)
    sim_root = SimRoot.load_or_create(root_file) if root_file.exists() else None
    return open_store(state_dir, sim_root, measurement or measure("keyservice"))


@keyservice.command("audit")
@click.option("--state-dir", type=click.Path(path_type=Path, exists=True), default=DEFAULT_STATE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print entries as JSON lines.")
@click.option("--tail", type=int, default=0, help="Print only the last N entries (the chain is still checked whole).")
def audit(state_dir: Path, as_json: bool, tail: int) -> None:
    """Print the audit log, verify its hash chain, and check that every policy row (principals,
    models, versions, grants, request keys) is what the chain last recorded. Exit 1 on any
    alteration."""
    from datetime import UTC, datetime

    from veil.errors import VeilError
    from veil.keyservice.store import verify_audit_chain

    try:
        store = _open_store(state_dir, None)
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    entries = store.audit_entries()
    for seq, entry_json, _, _ in entries[-tail:] if tail else entries:
        if as_json:
            click.echo(entry_json)
        else:
            e = json.loads(entry_json)
            when = datetime.fromtimestamp(float(e.get("ts", 0)), UTC).isoformat(timespec="milliseconds")
            outcome = e.get("outcome", "")
            detail = e.get("reason") or e.get("measurement") or ""
            click.echo(
                f"{seq:6d} {when} {e.get('actor', '')[:16]:16} {e.get('action', ''):18} "
                f"{e.get('subject', '') or '':30} {outcome:8} {detail}"
            )
    ok, message = verify_audit_chain(entries, store._audit_key)
    click.echo(("chain OK: " if ok else "CHAIN BROKEN: ") + message, err=True)
    problems = store.policy_problems() if ok else []
    for problem in problems:
        click.echo(f"POLICY ROW ALTERED: {problem}", err=True)
    if ok and not problems:
        click.echo("policy rows OK: every row matches its last audited state", err=True)
    if not ok or problems:
        raise SystemExit(1)


@keyservice.command("migrate")
@click.option("--state-dir", type=click.Path(path_type=Path, exists=True), default=DEFAULT_STATE, show_default=True)
@click.option("--from-measurement", required=True, help="Measurement of the KeyService build that sealed this state.")
@click.option(
    "--to-measurement",
    default=None,
    help="Measurement of the build that will open it (default: this installed KeyService's).",
)
def migrate(state_dir: Path, from_measurement: str, to_measurement: str | None) -> None:
    """Hand this state directory's database key from one KeyService build to another.

    The KeyService seals its database key to its own measurement, so an upgraded build cannot
    open the old state until the old build hands the key over. In the simulated TEE the simulated
    CPU derives both sealing keys; on SGX this step runs inside the old enclave (see
    docs/keyservice.md, "Upgrades")."""
    from veil.attest.measurement import measure
    from veil.attest.sim import SimRoot
    from veil.errors import VeilError
    from veil.keyservice.server import migrate_database_key, sealing_key, sim_root_path

    root_file = sim_root_path(state_dir)
    if not root_file.exists():
        raise click.ClickException("only simulated deployments migrate here; on SGX run it in the old enclave")
    root = SimRoot.load_or_create(root_file)
    target = to_measurement or measure("keyservice")
    try:
        migrate_database_key(state_dir, sealing_key(root, from_measurement), sealing_key(root, target))
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    click.echo(f"database key re-sealed from {from_measurement[:16]}… to {target[:16]}…")
