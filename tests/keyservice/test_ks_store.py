"""Persistence: sealing at rest, row binding, restart, audit chain, and no plaintext keys on disk or in logs."""

from __future__ import annotations

import logging
import sqlite3
import subprocess

import pytest
from ks_helpers import RUNTIME, _keys, error_of, setup_model

from veil.crypto.encoding import b64e
from veil.errors import VeilError


def db_path(ks):
    return ks.state_dir / "keyservice.db"


def raw_db(ks) -> sqlite3.Connection:
    """A second, independent connection to the live database file: the attacker's view."""
    return sqlite3.connect(db_path(ks), isolation_level=None)


def release_error(ks, user_id: str) -> tuple[int, str]:
    with pytest.raises(VeilError) as exc:
        ks.runtime(RUNTIME).release("iris", user_id)
    return exc.value.status, exc.value.code


def test_flipped_byte_in_sealed_blob_is_a_store_integrity_error(keyservice_server) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    with raw_db(ks) as db:
        (blob,) = db.execute("SELECT sealed_key FROM request_keys").fetchone()
        tampered = bytearray(blob)
        tampered[len(blob) // 2] ^= 0x01
        db.execute("UPDATE request_keys SET sealed_key=?", (bytes(tampered),))
    status, code = release_error(ks, m.user.identity.id)
    assert (status, code) == (500, "store_integrity")
    with pytest.raises(VeilError, match="tampered"):
        ks.runtime(RUNTIME).release("iris", m.user.identity.id)


def test_sealed_record_copied_to_another_row_fails(keyservice_server) -> None:
    """AAD = record key: user A's sealed request key pasted into user B's row does not open."""
    ks = keyservice_server
    m = setup_model(ks)
    other = ks.principal()
    from veil.crypto.keys import SymmetricKey

    other.put_request_key("iris", SymmetricKey.generate(), [RUNTIME])
    m.owner.grant("iris", other.identity.id)
    assert ks.runtime(RUNTIME).release("iris", other.identity.id)
    with raw_db(ks) as db:
        (blob,) = db.execute("SELECT sealed_key FROM request_keys WHERE user_id=?", (m.user.identity.id,)).fetchone()
        db.execute("UPDATE request_keys SET sealed_key=? WHERE user_id=?", (blob, other.identity.id))
        # and the model key moved onto the request-key row's sibling: a model key pasted as a request key
        (model_blob,) = db.execute("SELECT sealed_key FROM model_versions").fetchone()
    assert release_error(ks, other.identity.id) == (500, "store_integrity")
    with raw_db(ks) as db:
        db.execute("UPDATE request_keys SET sealed_key=? WHERE user_id=?", (model_blob, m.user.identity.id))
    assert release_error(ks, m.user.identity.id) == (500, "store_integrity")


def test_state_survives_restart(tmp_path, keyservice_factory) -> None:
    state = tmp_path / "ks"
    first = keyservice_factory.start(state)
    m = setup_model(first)
    public_key = first.service.keypair.public_key
    keyservice_factory.stop(first)
    second = keyservice_factory.start(state)
    assert second.service.keypair.public_key == public_key  # same attested key: pinned clients keep working
    runtime = second.runtime(RUNTIME)
    assert _keys(runtime.release("iris", m.user.identity.id)) == (m.model_key, m.request_key)
    # The old clients (pinned key, registered identities) still work against the restarted service.
    m.owner.close()
    from veil.keyservice.client import PrincipalClient

    owner = PrincipalClient(
        second.url, m.owner.identity, expected_measurements=set(), trust=second.trust(), allow_simulated=True
    )
    owner._pinned, owner._signing_key = public_key, second.service.signer.public_key
    second.clients.append(owner)
    owner.revoke("iris", m.user.identity.id)
    with pytest.raises(VeilError) as exc:
        runtime.release("iris", m.user.identity.id)
    assert exc.value.code == "not_granted"


def _audit_cli(veil_cli, state) -> subprocess.CompletedProcess:
    return subprocess.run([*veil_cli, "keyservice", "audit", "--state-dir", str(state)], capture_output=True, text=True)


def test_audit_chain_detects_removed_and_altered_entries(keyservice_server, veil_cli) -> None:
    ks = keyservice_server
    m = setup_model(ks)
    ks.runtime(RUNTIME).release("iris", m.user.identity.id)
    ok = _audit_cli(veil_cli, ks.state_dir)
    assert ok.returncode == 0, ok.stderr
    assert "chain OK" in ok.stderr and "release" in ok.stdout
    entries = ks.service.store.audit_entries()
    assert len(entries) >= 6
    with raw_db(ks) as db:
        db.execute("UPDATE audit SET entry=replace(entry, '\"allowed\"', '\"refused\"') WHERE seq=3")
    altered = _audit_cli(veil_cli, ks.state_dir)
    assert altered.returncode == 1 and "entry 3" in altered.stderr and "altered" in altered.stderr
    with raw_db(ks) as db:
        db.execute("UPDATE audit SET entry=? WHERE seq=3", (entries[2][1],))
    assert _audit_cli(veil_cli, ks.state_dir).returncode == 0
    with raw_db(ks) as db:
        db.execute("DELETE FROM audit WHERE seq=2")
    removed = _audit_cli(veil_cli, ks.state_dir)
    assert removed.returncode == 1 and "entry 2 is missing" in removed.stderr
    with raw_db(ks) as db:  # renumber to hide the gap: the link still breaks
        db.execute("UPDATE audit SET seq=seq-1 WHERE seq>2")
    renumbered = _audit_cli(veil_cli, ks.state_dir)
    assert renumbered.returncode == 1 and "link broken" in renumbered.stderr


def test_no_key_material_in_database_or_logs(tmp_path, keyservice_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ks = keyservice_factory.start(tmp_path / "ks")
    m = setup_model(ks)
    runtime = ks.runtime(RUNTIME)
    runtime.release("iris", m.user.identity.id)
    with pytest.raises(VeilError):
        ks.runtime("bb" * 32).release("iris", m.user.identity.id)
    secrets = [
        m.model_key.material(),
        m.request_key.material(),
        ks.service.keypair.private_bytes(),
        m.owner.identity.to_private_bytes(),
        m.user.identity.to_private_bytes(),
    ]
    keyservice_factory.stop(ks)  # checkpoint and close, so everything is in the files
    blobs = b"".join(p.read_bytes() for p in ks.state_dir.glob("keyservice.db*"))
    assert blobs
    logs = caplog.text
    for secret in secrets:
        for form in (secret, secret.hex().encode(), b64e(secret).encode()):
            assert form not in blobs
            assert form.decode("latin-1") not in logs
    assert "SIMULATED" in logs  # the capture really saw the KeyService's logs


def test_store_schema_version_and_error_body_on_integrity(keyservice_server) -> None:
    ks = keyservice_server
    assert ks.service.store.schema_version() == 3
    m = setup_model(ks)
    with raw_db(ks) as db:
        db.execute("UPDATE model_versions SET sealed_key=x'00'")
    answer = ks.http().post(
        "/v1/release",
        json={"v": 1, "session": ks.runtime(RUNTIME).attest(), "model": "iris", "user": m.user.identity.id},
    )
    assert error_of(answer) == (500, "store_integrity")
