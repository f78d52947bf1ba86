"""Everything the page shows, as one JSON document, and where each part comes from.

- principals, trust anchors, request keys: the client directory (this machine);
- the KeyService's attestation, each model's owner, current version and revocation delay: the
  KeyService over its attested, signed channel, verified by the SDK;
- model cards: relayed by the gateway, believed only after `ModelUser.card` checked the owner's
  signature and the current version;
- versions, grants, revocations, allowed measurements, key releases: the audit log (verified by
  `veil keyservice audit`, where readable here) and the console's own ledger;
- usage: what this console measured, and the gateway's public figures, kept apart.

Each part fails on its own: a KeyService that is down does not hide the ledger, and so on.
"""

from __future__ import annotations

import time
from typing import Any

from veil.console import history
from veil.console.audit import read_audit
from veil.console.context import ConsoleContext
from veil.console.metrics import gateway_figures
from veil.errors import VeilError
from veil.wire.cards import ModelCard

AUDIT_TAIL = 200


def _error(exc: Exception) -> str:
    if isinstance(exc, VeilError):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def card_json(card: ModelCard) -> dict[str, Any]:
    return {
        **card.to_json(),
        "inputs": [{**t.to_json(), "describe": t.describe()} for t in card.inputs],
        "outputs": [{**t.to_json(), "describe": t.describe()} for t in card.outputs],
        "verified": True,
    }


def _attestation(ctx: ConsoleContext) -> dict[str, Any]:
    """Verify the KeyService's evidence afresh against this principal's anchors (a new nonce)."""
    try:
        ctx.reader.keyservice.connect()
        return {"verified": True, "at": time.time()}
    except (VeilError, OSError) as exc:
        return {"verified": False, "error": _error(exc)}


def _model(ctx: ConsoleContext, model: str, events: list[history.Event]) -> dict[str, Any]:
    """One model: the KeyService's facts, the verified card, and what the records say."""
    row: dict[str, Any] = {"id": model}
    try:
        info = ctx.reader.keyservice.model_info(model)
        row["owner"] = info.get("owner")
        row["current_version"] = info.get("current_version")
        row["revocation_delay_s"] = info.get("revocation_delay_s")
    except VeilError as exc:
        row["error"] = _error(exc)
        return row
    me = {p.id for p in ctx.principals().values()}
    row["owned_by_me"] = row["owner"] in me
    try:
        row["card"] = card_json(ctx.reader.card(model, refresh=True))
    except VeilError as exc:
        row["card_error"] = _error(exc)
    by_owner = [e for e in events if e.get("actor") == row["owner"] or e["action"] == "release"]
    row["versions"] = history.versions(by_owner, model)
    row["owner_measurements"] = history.owner_measurements(by_owner, model)
    for_user = None if row["owned_by_me"] or ctx.user is None else ctx.user.id
    row["releases"] = history.releases(by_owner, model, for_user)
    if ctx.user is not None:
        row["request_key"] = model in ctx.user.request_keys
    return row


def _relevant(ctx: ConsoleContext, events: list[history.Event]) -> list[history.Event]:
    """The events about this principal: its own actions, grants naming it, releases to it, and
    every ledger entry (the ledger is this client directory's own)."""
    me = {p.id for p in ctx.principals().values()}
    user_id = ctx.user.id if ctx.user is not None else None
    return [
        e
        for e in events
        if e["source"] == "console" or e.get("actor") in me or (user_id is not None and e.get("user") == user_id)
    ]


def build_state(ctx: ConsoleContext) -> dict[str, Any]:
    """The page's whole document (blocking: signed KeyService calls, the audit process, HTTP)."""
    audit = read_audit(ctx.deployment_path, ctx.deployment, ctx.keyservice_state_dir)
    ledger = ctx.ledger.entries()
    events = history.audit_events(audit.entries) + history.ledger_events(ledger)
    mine = _relevant(ctx, events)
    names = history.known_models(mine)
    if ctx.user is not None:
        ctx.reload_request_keys()
        names += [m for m in sorted(ctx.user.request_keys) if m not in names]
    models = [_model(ctx, m, events) for m in names]
    delays = {m["id"]: m.get("revocation_delay_s") for m in models}
    owned = {m["id"] for m in models if m.get("owned_by_me")}
    grant_events = [e for e in mine if e.get("model") in owned or (ctx.user and e.get("user") == ctx.user.id)]
    return {
        "now": time.time(),
        "console": {
            "client_dir": str(ctx.client_dir),
            "deployment": str(ctx.deployment_path),
            "gateway_url": ctx.deployment.gateway_url,
            "keyservice_url": ctx.deployment.keyservice_url,
        },
        "principals": {role: {"id": p.id} for role, p in ctx.principals().items()},
        "trust": {**ctx.trust.to_json(), "file": str(ctx.client_dir / "trust.json")},
        "attestation": _attestation(ctx),
        "models": models,
        "grants": [{**g, "owned_by_me": g["model"] in owned} for g in history.grant_rows(grant_events, delays)],
        "usage": {
            "console": ctx.usage.summary(),
            "gateway": gateway_figures(ctx.deployment.gateway_url, ctx.price_per_gb_s),
        },
        "audit": audit.to_json(tail=AUDIT_TAIL),
        "activity": ledger[-50:][::-1],
    }
