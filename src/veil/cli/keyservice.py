"""`veil keyservice ...`: serve the KeyService, print and verify its audit log."""

from __future__ import annotations

import json
import logging
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
    """Start the KeyService HTTP API. State survives restarts."""
    from veil.keyservice.server import build_keyservice
    from veil.keyservice.server import serve as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ks = build_keyservice(state_dir, allow_simulated=allow_simulated, durability=durability)
    except Exception as exc:  # noqa: BLE001 - startup failures are reported, not traced
        raise click.ClickException(f"cannot start the KeyService: {exc}") from None
    click.echo(
        f"KeyService listening on http://{host}:{port} (state {state_dir}, attested by {ks.provider.describe()})",
        err=True,
    )
    run(ks, host, port)


@keyservice.command("audit")
@click.option("--state-dir", type=click.Path(path_type=Path, exists=True), default=DEFAULT_STATE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print entries as JSON lines.")
@click.option("--tail", type=int, default=0, help="Print only the last N entries (the chain is still checked whole).")
def audit(state_dir: Path, as_json: bool, tail: int) -> None:
    """Print the audit log and verify its hash chain (exit 1 if it was altered)."""
    from veil.attest.sim import SimRoot
    from veil.crypto.at_rest import Sealer
    from veil.crypto.kdf import derive_key
    from veil.keyservice.server import sealing_key, sim_root_path
    from veil.keyservice.store import Store, verify_audit_chain

    root_file = sim_root_path(state_dir)
    key = sealing_key(SimRoot.load_or_create(root_file) if root_file.exists() else None)
    audit_key = derive_key(key, b"veil audit chain", b"")
    store = Store(state_dir / "keyservice.db", Sealer(key), audit_key)
    entries = store.audit_entries()
    for seq, entry_json, _, _ in entries[-tail:] if tail else entries:
        if as_json:
            click.echo(entry_json)
        else:
            e = json.loads(entry_json)
            outcome = e.get("outcome", "")
            detail = e.get("reason") or e.get("measurement") or ""
            click.echo(
                f"{seq:6d} {e.get('ts', 0):.3f} {e.get('actor', '')[:16]:16} {e.get('action', ''):18} "
                f"{e.get('subject', '') or '':30} {outcome:8} {detail}"
            )
    ok, message = verify_audit_chain(entries, audit_key)
    click.echo(("chain OK: " if ok else "CHAIN BROKEN: ") + message, err=True)
    if not ok:
        raise SystemExit(1)
