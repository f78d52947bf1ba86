"""Policy at rest is authenticated: an operator who edits the KeyService database (un-revokes a
user, widens an allow-list, swaps a model's owner or a principal's key, rolls a row back, deletes
one) gets refusals, and `veil keyservice audit` names the row."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
from ks_helpers import OTHER, RUNTIME, setup_model

from veil.errors import VeilError


def _db(ks) -> sqlite3.Connection:
    return sqlite3.connect(ks.state_dir / "keyservice.db", isolation_level=None)


def _release_code(ks, user_id: str, model: str = "iris") -> str | None:
    try:
        ks.runtime(RUNTIME).release(model, user_id)
    except VeilError as exc:
        return exc.code
    return None


def _audit(veil_cli, ks) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*veil_cli, "keyservice", "audit", "--state-dir", str(ks.state_dir)], capture_output=True, text=True
    )


def test_clean_database_audits_ok(keyservice_server, veil_cli) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    m.owner.revoke("iris", m.user.identity.id)
    result = _audit(veil_cli, ks)
    assert result.returncode == 0, result.stderr
    assert "policy rows OK" in result.stderr and "chain OK" in result.stderr


EDITS = {
    "un-revoke": ("UPDATE grants SET revoked_at=NULL", "grant/iris/"),
    "widen-owner-allow-list": (f"UPDATE models SET measurements='{json.dumps(['ff' * 32, RUNTIME])}'", "model/iris"),
    "widen-user-allow-list": (
        f"UPDATE request_keys SET measurements='{json.dumps(['ff' * 32, RUNTIME])}'",
        "request_key/iris/",
    ),
    "user-delay": ("UPDATE request_keys SET max_delay_s=300", "request_key/iris/"),
    "owner-delay": ("UPDATE models SET revocation_delay_s=300", "model/iris"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_policy_row_is_refused_and_reported(keyservice_server, veil_cli, edit: str) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    if edit == "un-revoke":
        m.owner.revoke("iris", m.user.identity.id)
        assert _release_code(ks, m.user.identity.id) == "not_granted"
    else:
        assert _release_code(ks, m.user.identity.id) is None
    statement, record = EDITS[edit]
    with _db(ks) as db:
        assert db.execute(statement).rowcount == 1
    assert _release_code(ks, m.user.identity.id) == "store_integrity"
    result = _audit(veil_cli, ks)
    assert result.returncode == 1
    assert "POLICY ROW ALTERED" in result.stderr and record in result.stderr, result.stderr


def test_swapped_owner_and_principal_key_are_refused(keyservice_server, veil_cli) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    intruder = ks.principal()
    with _db(ks) as db:  # the operator makes its own principal the model's owner
        db.execute("UPDATE models SET owner_id=?", (intruder.identity.id,))
    with pytest.raises(VeilError) as info:
        intruder.set_measurements("iris", [OTHER])
    assert info.value.code == "store_integrity"
    with _db(ks) as db:  # restore it: the row matches its audited state again
        db.execute("UPDATE models SET owner_id=?", (m.owner.identity.id,))
    assert _release_code(ks, m.user.identity.id) is None
    with _db(ks) as db:  # now swap the owner's public key for the intruder's
        db.execute("UPDATE principals SET public_key=? WHERE id=?", (intruder.identity.public_key, m.owner.identity.id))
    with pytest.raises(VeilError) as info:
        m.owner.grant("iris", intruder.identity.id)
    assert info.value.code == "store_integrity"
    result = _audit(veil_cli, ks)
    assert result.returncode == 1 and f"principal/{m.owner.identity.id}" in result.stderr


def test_row_rolled_back_to_an_older_genuine_state_is_refused(keyservice_server) -> None:
    """Copying back the grant row as it was before the revoke (a genuine old row) is caught: the
    chain says the latest state is 'revoked'."""
    ks = keyservice_server
    m = setup_model(ks)
    with _db(ks) as db:
        before = db.execute("SELECT * FROM grants").fetchone()
    m.owner.revoke("iris", m.user.identity.id)
    with _db(ks) as db:
        db.execute("DELETE FROM grants")
        db.execute("INSERT INTO grants VALUES (?, ?, ?, ?)", before)
    assert _release_code(ks, m.user.identity.id) == "store_integrity"


def test_deleted_and_inserted_rows_are_refused(keyservice_server, veil_cli) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    stranger = ks.principal()
    with _db(ks) as db:  # a grant row the KeyService never wrote
        db.execute("INSERT INTO grants VALUES ('iris', ?, 0, NULL)", (stranger.identity.id,))
    assert _release_code(ks, stranger.identity.id) == "store_integrity"
    with _db(ks) as db:  # the user's request key row disappears
        db.execute("DELETE FROM request_keys")
    assert _release_code(ks, m.user.identity.id) == "store_integrity"
    result = _audit(veil_cli, ks)
    assert result.returncode == 1
    assert "inserted outside" in result.stderr and "deleted outside" in result.stderr


def test_tampering_while_stopped_is_refused_after_restart(tmp_path, keyservice_factory, veil_cli) -> None:
    state = tmp_path / "ks"
    first = keyservice_factory.start(state)
    m = setup_model(first)
    m.owner.revoke("iris", m.user.identity.id)
    keyservice_factory.stop(first)
    with sqlite3.connect(state / "keyservice.db", isolation_level=None) as db:
        db.execute("UPDATE grants SET revoked_at=NULL")
    second = keyservice_factory.start(state)
    assert f"grant/iris/{m.user.identity.id}" in second.service.store.tampered
    assert _release_code(second, m.user.identity.id) == "store_integrity"


def test_release_reads_policy_in_one_transaction(keyservice_server) -> None:
    """A revoke committed while a release is reading cannot be half-seen: the release's reads
    happen in one read transaction under the store's lock, so a writer waits for it."""
    ks = keyservice_server
    m = setup_model(ks)
    store = ks.service.store
    view = store.release_view("iris", m.user.identity.id)
    assert view.granted and view.request_key == m.request_key.material()
    assert view.model_key == m.model_key.material() and view.version is not None
    # a revoke in between two views changes the next view whole
    m.owner.revoke("iris", m.user.identity.id)
    after = store.release_view("iris", m.user.identity.id)
    assert not after.granted and after.request_key is None
