"""The KeyService's state is sealed to its own measurement (MRENCLAVE-style), not to its signer:
another KeyService build cannot open it, and an upgrade hands the database key over explicitly
with `veil keyservice migrate`."""

from __future__ import annotations

import subprocess

import pytest
from ks_helpers import RUNTIME, setup_model

from veil.errors import StoreIntegrityError
from veil.keyservice.server import DATABASE_KEY_FILE, build_keyservice

OLD, NEW = "0a" * 32, "0b" * 32


def _migrate(veil_cli, state, old: str, new: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *veil_cli,
            "keyservice",
            "migrate",
            "--state-dir",
            str(state),
            "--from-measurement",
            old,
            "--to-measurement",
            new,
        ],
        capture_output=True,
        text=True,
    )


def test_another_build_cannot_open_the_state_until_migrated(tmp_path, veil_cli) -> None:
    state = tmp_path / "ks"
    ks = build_keyservice(state, allow_simulated=True, measurement=OLD)
    ks.store.audit({"actor": "test", "action": "marker", "outcome": "allowed"})
    hpke_public = ks.keypair.public_key
    ks.store.close()

    with pytest.raises(StoreIntegrityError, match="migrate"):
        build_keyservice(state, allow_simulated=True, measurement=NEW)  # same simulated CPU, other code

    bad = _migrate(veil_cli, state, NEW, OLD)  # the wrong way round: NEW never held the key
    assert bad.returncode != 0 and "store_integrity" in bad.stderr, bad.stderr
    ok = _migrate(veil_cli, state, OLD, NEW)
    assert ok.returncode == 0, ok.stderr

    upgraded = build_keyservice(state, allow_simulated=True, measurement=NEW)
    try:
        assert upgraded.keypair.public_key == hpke_public  # same state, same sealed service keys
        assert any("marker" in e[1] for e in upgraded.store.audit_entries())
        assert not upgraded.store.tampered and upgraded.store.integrity_failure is None
    finally:
        upgraded.store.close()
    with pytest.raises(StoreIntegrityError):  # and the old build no longer opens it
        build_keyservice(state, allow_simulated=True, measurement=OLD)


def test_state_moves_over_whole_through_a_migration(tmp_path, keyservice_factory, veil_cli) -> None:
    """A served KeyService's principals, models, grants and keys survive an upgrade hand-over."""
    from veil.attest.measurement import measure

    state = tmp_path / "ks"
    first = keyservice_factory.start(state)
    m = setup_model(first)
    keyservice_factory.stop(first)
    assert _migrate(veil_cli, state, measure("keyservice"), NEW).returncode == 0
    upgraded = build_keyservice(state, allow_simulated=True, measurement=NEW)
    try:
        view = upgraded.store.release_view("iris", m.user.identity.id)
        assert view.granted and view.model_key == m.model_key.material()
        assert view.request_key == m.request_key.material() and RUNTIME in view.user_measurements
    finally:
        upgraded.store.close()


def test_missing_database_key_with_a_database_is_refused(tmp_path) -> None:
    state = tmp_path / "ks"
    build_keyservice(state, allow_simulated=True, measurement=OLD).store.close()
    (state / DATABASE_KEY_FILE).unlink()
    with pytest.raises(StoreIntegrityError, match="missing"):
        build_keyservice(state, allow_simulated=True, measurement=OLD)


def test_tampered_database_key_file_is_refused(tmp_path) -> None:
    state = tmp_path / "ks"
    build_keyservice(state, allow_simulated=True, measurement=OLD).store.close()
    path = state / DATABASE_KEY_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreIntegrityError):
        build_keyservice(state, allow_simulated=True, measurement=OLD)
