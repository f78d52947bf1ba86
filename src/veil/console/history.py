"""Policy history from two records: the KeyService's audit log (when readable here) and the
console's own ledger. Both become the same events, from which grants and revocations, versions,
the runtime measurements an owner allowed and key releases are derived.

Pure functions of the events, so what the page shows is testable without a deployment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Event = dict[str, Any]
# audit actions whose subject is "model/vN", "model/user" or just "model"
_VERSIONED = {"stage_version", "commit_version", "put_card"}
_PAIRED = {"grant", "revoke", "release"}


def _split_subject(action: str, subject: str) -> dict[str, Any]:
    if action in _VERSIONED and "/v" in subject:
        model, _, number = subject.rpartition("/v")
        return {"model": model, "version": int(number)} if number.isdigit() else {"model": subject}
    if action in _PAIRED and "/" in subject:
        model, _, user = subject.partition("/")
        return {"model": model, "user": user}
    return {"model": subject} if subject else {}


def audit_events(entries: Iterable[dict[str, Any]]) -> list[Event]:
    """Audit entries as events (`source: audit`); ids are never split wrongly, since model and
    principal ids cannot contain '/'."""
    out = []
    for entry in entries:
        action = str(entry.get("action", ""))
        event: Event = {
            "ts": float(entry.get("ts", 0)),
            "action": action,
            "actor": str(entry.get("actor", "")),
            "outcome": str(entry.get("outcome", "")),
            "source": "audit",
            **_split_subject(action, str(entry.get("subject", "") or "")),
        }
        for name in ("measurements", "revocation_delay_s", "max_revocation_delay_s", "measurement", "reason"):
            if entry.get(name) is not None:
                event[name] = entry[name]
        if action == "release" and isinstance(entry.get("version"), int):
            event["version"] = entry["version"]
        out.append(event)
    return out


def ledger_events(entries: Iterable[dict[str, Any]]) -> list[Event]:
    """The console's ledger entries as events (`source: console`; every one was allowed)."""
    return [{"outcome": "allowed", **e, "source": "console"} for e in entries]


def known_models(events: Iterable[Event]) -> list[str]:
    """Every model the events name, in first-seen order."""
    seen: dict[str, None] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        if isinstance(e.get("model"), str) and e["model"]:
            seen.setdefault(e["model"], None)
    return list(seen)


def grant_rows(events: Iterable[Event], delays: dict[str, int | None]) -> list[dict[str, Any]]:
    """The latest grant state of each (model, user), with when it changed and, for a revocation,
    until when runtimes may still serve the user: the change time plus the model's revocation delay
    (a user who asked for a shorter one is cut off sooner)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    sources: dict[tuple[str, str], set[str]] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["action"] not in ("grant", "revoke") or e.get("outcome") != "allowed" or "user" not in e:
            continue
        pair = (e["model"], e["user"])
        sources.setdefault(pair, set()).add(e["source"])
        latest[pair] = e
    rows = []
    for (model, user), e in sorted(latest.items()):
        delay = e.get("revocation_delay_s", delays.get(model))
        granted = e["action"] == "grant"
        rows.append(
            {
                "model": model,
                "user": user,
                "granted": granted,
                "since": e["ts"],
                "revocation_delay_s": delay,
                "effective_by": None if granted or delay is None else e["ts"] + delay,
                "sources": sorted(sources[(model, user)]),
            }
        )
    return rows


def versions(events: Iterable[Event], model: str) -> list[dict[str, Any]]:
    """Each version of `model` the events know: when staged and made current, what it allowed."""
    found: dict[int, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("model") != model or not isinstance(e.get("version"), int) or e.get("outcome") != "allowed":
            continue
        row = found.setdefault(e["version"], {"version": e["version"]})
        if e["action"] in ("stage_version", "publish"):
            row.setdefault("staged_at", e["ts"])
            for name in ("measurements", "revocation_delay_s"):
                if e.get(name) is not None:
                    row[name] = e[name]
        if e["action"] in ("commit_version", "publish"):
            row["current_at"] = e["ts"]
        if e["action"] == "put_card":
            row["card"] = True
    return [found[v] for v in sorted(found)]


def owner_measurements(events: Iterable[Event], model: str) -> dict[str, Any] | None:
    """The runtime measurements the owner last allowed for `model` (a published version's, or a
    later `set-measurements`), with when and from which record; None if no record says."""
    latest = None
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("model") != model or e.get("outcome") != "allowed" or not e.get("measurements"):
            continue
        if e["action"] in ("stage_version", "publish", "set_measurements"):
            latest = {"measurements": list(e["measurements"]), "since": e["ts"], "source": e["source"]}
    return latest


def releases(events: Iterable[Event], model: str, user: str | None = None) -> dict[str, Any]:
    """Key releases to runtimes for `model` (for one user, if given): allowed, refused, the last
    refusal's reason, and the runtime measurements that received keys."""
    allowed = refused = 0
    last_refusal, measurements = "", set()
    for e in events:
        if e["action"] != "release" or e.get("model") != model or (user is not None and e.get("user") != user):
            continue
        if e.get("outcome") == "allowed":
            allowed += 1
            if e.get("measurement"):
                measurements.add(str(e["measurement"]))
        else:
            refused += 1
            last_refusal = str(e.get("reason", ""))
    return {"allowed": allowed, "refused": refused, "last_refusal": last_refusal, "measurements": sorted(measurements)}
