"""What the console derives from the audit log and its own ledger: grants and revocations with
the time they take effect, versions, the owner's allowed measurements, key releases."""

from __future__ import annotations

from veil.console import history

OWNER, USER, OTHER = "a" * 64, "b" * 64, "c" * 64
M1 = "1" * 64


def _audit() -> list[dict]:
    return [
        {"ts": 10.0, "actor": OWNER, "action": "register", "outcome": "allowed"},
        {
            "ts": 11.0,
            "actor": OWNER,
            "action": "stage_version",
            "subject": "iris/v1",
            "outcome": "allowed",
            "measurements": [M1],
            "revocation_delay_s": 30,
        },
        {"ts": 12.0, "actor": OWNER, "action": "put_card", "subject": "iris/v1", "outcome": "allowed"},
        {"ts": 13.0, "actor": OWNER, "action": "commit_version", "subject": "iris/v1", "outcome": "allowed"},
        {"ts": 14.0, "actor": OWNER, "action": "grant", "subject": f"iris/{USER}", "outcome": "allowed"},
        {"ts": 15.0, "actor": OWNER, "action": "grant", "subject": f"iris/{OTHER}", "outcome": "allowed"},
        {"ts": 16.0, "actor": "runtime", "action": "release", "subject": f"iris/{USER}", "outcome": "allowed",
         "measurement": M1, "version": 1},
        {"ts": 17.0, "actor": OWNER, "action": "revoke", "subject": f"iris/{USER}", "outcome": "allowed"},
        {"ts": 18.0, "actor": "runtime", "action": "release", "subject": f"iris/{USER}", "outcome": "refused",
         "reason": "user not granted", "measurement": M1},
        {"ts": 19.0, "actor": OTHER, "action": "owner_op", "subject": "iris", "outcome": "refused",
         "reason": "not the owner"},
    ]  # fmt: skip


def test_audit_subjects_split_into_model_version_and_user() -> None:
    events = history.audit_events(_audit())
    assert events[1]["model"] == "iris" and events[1]["version"] == 1 and events[1]["measurements"] == [M1]
    assert events[4]["model"] == "iris" and events[4]["user"] == USER
    assert events[6]["version"] == 1 and events[6]["measurement"] == M1
    assert all(e["source"] == "audit" for e in events)
    assert history.known_models(events) == ["iris"]


def test_grants_keep_the_latest_state_and_say_when_a_revocation_takes_effect() -> None:
    events = history.audit_events(_audit())
    rows = {r["user"]: r for r in history.grant_rows(events, {"iris": 30})}
    assert rows[OTHER]["granted"] and rows[OTHER]["effective_by"] is None
    revoked = rows[USER]
    assert not revoked["granted"] and revoked["since"] == 17.0
    assert revoked["revocation_delay_s"] == 30 and revoked["effective_by"] == 47.0
    assert revoked["sources"] == ["audit"]


def test_the_ledger_and_the_audit_log_merge() -> None:
    """The console's own record carries the delay it asked for right after the revoke."""
    ledger = [{"ts": 20.0, "action": "grant", "model": "iris", "user": USER, "role": "owner", "actor": OWNER},
              {"ts": 21.0, "action": "revoke", "model": "iris", "user": USER, "actor": OWNER,
               "revocation_delay_s": 5}]  # fmt: skip
    events = history.audit_events(_audit()) + history.ledger_events(ledger)
    row = next(r for r in history.grant_rows(events, {"iris": 30}) if r["user"] == USER)
    assert row["since"] == 21.0 and row["revocation_delay_s"] == 5 and row["effective_by"] == 26.0
    assert row["sources"] == ["audit", "console"]


def test_versions_measurements_and_releases() -> None:
    events = history.audit_events(_audit())
    assert history.versions(events, "iris") == [
        {"version": 1, "staged_at": 11.0, "measurements": [M1], "revocation_delay_s": 30, "card": True,
         "current_at": 13.0}
    ]  # fmt: skip
    assert history.owner_measurements(events, "iris") == {"measurements": [M1], "since": 11.0, "source": "audit"}
    assert history.releases(events, "iris") == {
        "allowed": 1,
        "refused": 1,
        "last_refusal": "user not granted",
        "measurements": [M1],
    }
    assert history.releases(events, "iris", OTHER)["allowed"] == 0
    assert history.owner_measurements(events, "unknown") is None
