"""SQLite persistence of the KeyService (WAL, versioned migrations, key material sealed at rest,
policy rows authenticated).

One connection guarded by a lock: every operation is a few hundred microseconds, and a single
writer keeps the audit chain's order total. WAL with synchronous=NORMAL survives a `kill -9`
with every committed transaction (commits reach the OS before they are acknowledged);
`durability="full"` also fsyncs each commit, for power loss.

Policy at rest. The operator can edit the database file. Key material is sealed (AES-GCM, AAD =
record key); every policy row (principal, model, model version, grant, request key) has a
*row MAC* (HMAC under a key derived from the database key) over its record key and its security
fields, and every audit entry that changes a row records the row's new MAC in its `state`. The
audit chain is itself HMAC-linked. At start the store walks the chain and learns, for every
record, the MAC it must have now (and, per principal, the highest sequence number it
accepted); each read that a decision depends on recomputes the row's MAC
and compares. An edited row (un-revoke, a widened allow-list, a swapped owner key), a row rolled
back to an older genuine version, or a deleted row is therefore refused with `store_integrity`,
and `veil keyservice audit` reports it. (Rolling back the *whole* file, audit included, is not
detectable without a hardware monotonic counter: see docs/threat-model.md.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from veil.crypto.at_rest import Sealer
from veil.crypto.encoding import canonical_json
from veil.crypto.errors import CryptoError
from veil.crypto.keys import SymmetricKey
from veil.errors import StoreIntegrityError

GENESIS = "0" * 64

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE principals (id TEXT PRIMARY KEY, public_key BLOB NOT NULL, created REAL NOT NULL);
    CREATE TABLE models (
        model_id TEXT PRIMARY KEY, owner_id TEXT NOT NULL REFERENCES principals(id),
        sealed_key BLOB, measurements TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL);
    CREATE TABLE grants (
        model_id TEXT NOT NULL REFERENCES models(model_id), user_id TEXT NOT NULL REFERENCES principals(id),
        granted_at REAL NOT NULL, revoked_at REAL, PRIMARY KEY (model_id, user_id));
    CREATE TABLE request_keys (
        model_id TEXT NOT NULL REFERENCES models(model_id), user_id TEXT NOT NULL REFERENCES principals(id),
        sealed_key BLOB NOT NULL, measurements TEXT NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (model_id, user_id));
    CREATE TABLE nonces (principal_id TEXT NOT NULL, nonce TEXT NOT NULL, ts REAL NOT NULL,
        PRIMARY KEY (principal_id, nonce));
    CREATE INDEX nonces_ts ON nonces(ts);
    CREATE TABLE service_secrets (name TEXT PRIMARY KEY, sealed BLOB NOT NULL);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY, ts REAL NOT NULL, entry TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    """,
    # 2: model versions, revocation delays, per-principal sequence numbers. Version-1 model keys
    # sealed files without a version binding; they are not carried over (owners re-publish).
    """
    ALTER TABLE models ADD COLUMN current_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE models ADD COLUMN revocation_delay_s INTEGER NOT NULL DEFAULT 60;
    UPDATE models SET sealed_key = NULL;
    CREATE TABLE model_versions (
        model_id TEXT NOT NULL REFERENCES models(model_id), version INTEGER NOT NULL,
        digest TEXT NOT NULL, sealed_key BLOB NOT NULL, state TEXT NOT NULL,
        measurements TEXT, revocation_delay_s INTEGER, created REAL NOT NULL,
        PRIMARY KEY (model_id, version));
    ALTER TABLE request_keys ADD COLUMN max_delay_s INTEGER;
    CREATE TABLE principal_seq (principal_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
    DROP TABLE nonces;
    """,
    # 3: owner-signed model cards, one per version (public; users check the owner's signature)
    """
    ALTER TABLE model_versions ADD COLUMN card TEXT;
    """,
]


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    owner_id: str
    measurements: list[str]
    current_version: int
    revocation_delay_s: int

    @property
    def has_key(self) -> bool:
        return self.current_version > 0


@dataclass(frozen=True)
class VersionRecord:
    model_id: str
    version: int
    digest: str
    state: str  # "staged" | "current" | "retired"
    measurements: list[str] | None
    revocation_delay_s: int | None


@dataclass(frozen=True)
class ReleaseView:
    """Everything one key release decides on, read in one transaction and authenticated."""

    model: ModelRecord | None
    version: VersionRecord | None
    model_key: bytes | None
    granted: bool
    request_key: bytes | None
    user_measurements: list[str]
    user_max_delay_s: int | None


def chain_hash(audit_key: SymmetricKey, prev_hash: str, entry_json: str) -> str:
    """HMAC-SHA256 link: without the sealing-derived audit key nobody can re-forge the chain."""
    return hmac.new(audit_key.material(), prev_hash.encode() + b"\n" + entry_json.encode(), hashlib.sha256).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RowMacs:
    """The row-MAC function: HMAC(policy key, record key ‖ canonical JSON of the row's fields)."""

    def __init__(self, key: SymmetricKey) -> None:
        self._key = key.material()

    def mac(self, record: str, fields: dict[str, Any]) -> str:
        return hmac.new(self._key, record.encode() + b"\n" + canonical_json(fields), hashlib.sha256).hexdigest()


# -- the security fields of each kind of row, and its record key ----------------------------------
def principal_fields(public_key: bytes) -> dict[str, Any]:
    return {"public_key": public_key.hex()}


def model_fields(owner: str, measurements: list[str], current_version: int, delay: int) -> dict[str, Any]:
    return {
        "owner": owner,
        "measurements": sorted(measurements),
        "current_version": current_version,
        "revocation_delay_s": delay,
    }


def version_fields(
    digest: str, sealed_key: bytes, state: str, measurements: list[str] | None, delay: int | None
) -> dict[str, Any]:
    return {
        "digest": digest,
        "sealed_key": _sha(sealed_key),
        "state": state,
        "measurements": sorted(measurements) if measurements is not None else None,
        "revocation_delay_s": delay,
    }


def grant_fields(granted: bool) -> dict[str, Any]:
    return {"granted": granted}


def request_key_fields(sealed_key: bytes, measurements: list[str], max_delay_s: int | None) -> dict[str, Any]:
    return {"sealed_key": _sha(sealed_key), "measurements": sorted(measurements), "max_delay_s": max_delay_s}


def rec_principal(pid: str) -> str:
    return f"principal/{pid}"


def rec_model(model_id: str) -> str:
    return f"model/{model_id}"


def rec_version(model_id: str, version: int) -> str:
    return f"version/{model_id}/{version}"


def rec_grant(model_id: str, user_id: str) -> str:
    return f"grant/{model_id}/{user_id}"


def rec_request_key(model_id: str, user_id: str) -> str:
    return f"request_key/{model_id}/{user_id}"


def current_rows(db: sqlite3.Connection, macs: RowMacs) -> dict[str, str]:
    """record key → MAC of what every policy row of the database says now."""
    rows: dict[str, str] = {}
    for pid, pk in db.execute("SELECT id, public_key FROM principals"):
        rows[rec_principal(pid)] = macs.mac(rec_principal(pid), principal_fields(pk))
    for mid, owner, meas, cur, delay in db.execute(
        "SELECT model_id, owner_id, measurements, current_version, revocation_delay_s FROM models"
    ):
        rows[rec_model(mid)] = macs.mac(rec_model(mid), model_fields(owner, json.loads(meas), cur, delay))
    for mid, v, digest, sk, state, meas, delay in db.execute(
        "SELECT model_id, version, digest, sealed_key, state, measurements, revocation_delay_s FROM model_versions"
    ):
        fields = version_fields(digest, sk, state, json.loads(meas) if meas is not None else None, delay)
        rows[rec_version(mid, v)] = macs.mac(rec_version(mid, v), fields)
    for mid, uid, revoked in db.execute("SELECT model_id, user_id, revoked_at FROM grants"):
        rows[rec_grant(mid, uid)] = macs.mac(rec_grant(mid, uid), grant_fields(revoked is None))
    for mid, uid, sk, meas, md in db.execute(
        "SELECT model_id, user_id, sealed_key, measurements, max_delay_s FROM request_keys"
    ):
        rows[rec_request_key(mid, uid)] = macs.mac(
            rec_request_key(mid, uid), request_key_fields(sk, json.loads(meas), md)
        )
    return rows


def expected_state(entries: list[tuple[int, str, str, str]]) -> dict[str, str | None]:
    """record key → the MAC the latest audit entry that touched it recorded (None: deleted)."""
    state: dict[str, str | None] = {}
    for _, entry_json, _, _ in entries:
        changed = json.loads(entry_json).get("state")
        if isinstance(changed, dict):
            state.update(changed)
    return state


def policy_differences(rows: dict[str, str], expected: dict[str, str | None]) -> list[str]:
    """Records whose row does not match what the audit chain committed to, with why."""
    problems = []
    for record, mac in sorted(rows.items()):
        want = expected.get(record)
        if want is None:
            problems.append(f"{record}: row not recorded by any audit entry (inserted outside the KeyService)")
        elif not hmac.compare_digest(want, mac):
            problems.append(f"{record}: row differs from its last audited state (edited or rolled back)")
    for record, want in sorted(expected.items()):
        if want is not None and record not in rows:
            problems.append(f"{record}: row was deleted outside the KeyService")
    return problems


class Store:
    """Typed access to the KeyService database. Secrets go in and out only through `Sealer`;
    policy rows are checked against the audited state on every read a decision uses."""

    def __init__(
        self,
        path: Path,
        sealer: Sealer,
        audit_key: SymmetricKey,
        *,
        policy_key: SymmetricKey | None = None,
        durability: str = "normal",
    ) -> None:
        self.path = Path(path)
        self._audit_key = audit_key
        self._macs = RowMacs(policy_key or audit_key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sealer = sealer
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._pending: dict[str, str | None] = {}
        self._expected: dict[str, str | None] = {}
        self._last_seq: dict[str, int] = {}
        self.integrity_failure: str | None = None
        self.tampered: set[str] = set()
        self._last_hash = GENESIS
        migrated_from = self._migrate()
        self._load_expected_state()
        if 0 < migrated_from < len(MIGRATIONS):
            self._adopt_rows(migrated_from)

    # -- plumbing -------------------------------------------------------------------------
    def _migrate(self) -> int:
        """Apply pending migrations; returns the schema version found (0 for a new database)."""
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            current = row[0] if row else 0
            if current > len(MIGRATIONS):
                raise StoreIntegrityError(
                    f"database schema v{current} is newer than this KeyService (v{len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[version - 1].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute("DELETE FROM schema_version")
                    self._db.execute("INSERT INTO schema_version VALUES (?)", (version,))
                    self._db.execute("COMMIT")
                except Exception:
                    self._db.execute("ROLLBACK")
                    raise
            return current

    def _load_expected_state(self) -> None:
        """Walk the audit chain once: it says what every policy row must be now."""
        entries = self.audit_entries()
        ok, message = verify_audit_chain(entries, self._audit_key)
        if entries:
            self._last_hash = entries[-1][3]
        if not ok:
            self.integrity_failure = f"audit chain broken ({message}): refusing every policy decision"
            return
        self._expected = expected_state(entries)
        with self._lock:
            rows = current_rows(self._db, self._macs)
        for record, mac in rows.items():
            want = self._expected.get(record)
            if want is None or not hmac.compare_digest(want, mac):
                self.tampered.add(record)
        self.tampered.update(r for r, want in self._expected.items() if want is not None and r not in rows)
        with self._lock:
            self._last_seq = dict(self._db.execute("SELECT principal_id, last_seq FROM principal_seq").fetchall())
        # The sequence table is not authenticated row by row; the audited requests are. A counter
        # the operator lowered (to replay a captured request) is raised back to what the chain says.
        for _, entry_json, _, _ in entries:
            entry = json.loads(entry_json)
            seq, actor = entry.get("seq"), entry.get("actor")
            if isinstance(seq, int) and isinstance(actor, str) and seq > self._last_seq.get(actor, 0):
                self._last_seq[actor] = seq

    def _adopt_rows(self, from_version: int) -> None:
        """After a schema upgrade, record the existing rows' MACs in one audited entry."""
        with self.transaction() as db:
            rows = current_rows(db, self._macs)
            self.append_audit(
                db,
                {"actor": "keyservice", "action": "migrate", "from": from_version, "outcome": "allowed"},
                state=dict(rows),
            )
        self.tampered.clear()

    def schema_version(self) -> int:
        return self._db.execute("SELECT version FROM schema_version").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: either all of it (and its audit entries) lands, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            saved_hash = self._last_hash
            self._pending = {}
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._last_hash = saved_hash
                self._pending = {}
                raise
            self._expected.update(self._pending)
            for record in self._pending:
                self.tampered.discard(record)
            self._pending = {}

    def _open(self, record_key: str, sealed: bytes) -> bytes:
        try:
            return self._sealer.open(record_key, sealed)
        except CryptoError:  # includes a blob cut too short to parse: also tampering, not bad input
            raise StoreIntegrityError(
                f"sealed record {record_key!r} failed authentication: the database was tampered with"
            ) from None

    def _check(self, record: str, fields: dict[str, Any] | None) -> None:
        """Refuse a row (or the absence of one) that is not what the audit chain committed to."""
        if self.integrity_failure is not None:
            raise StoreIntegrityError(self.integrity_failure)
        want = self._expected.get(record)
        if fields is None:
            if want is not None:
                raise StoreIntegrityError(f"policy record {record!r} was deleted outside the KeyService")
            return
        mac = self._macs.mac(record, fields)
        if want is None or not hmac.compare_digest(want, mac):
            raise StoreIntegrityError(
                f"policy record {record!r} does not match its audited state: the database was tampered with"
            )

    def _record(self, record: str, fields: dict[str, Any] | None) -> None:
        """Note a row's new MAC for the audit entry of the current transaction."""
        self._pending[record] = self._macs.mac(record, fields) if fields is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- audit ----------------------------------------------------------------------------
    def append_audit(self, db: sqlite3.Connection, entry: dict[str, Any], *, state: dict | None = None) -> None:
        """Append to the hash chain inside the caller's transaction; the entry commits to the new
        MACs of every row this transaction changed."""
        changed = {**self._pending, **(state or {})}
        if state:
            self._pending.update(state)
        ts = time.time()
        body = {**entry, "ts": round(ts, 6)}
        if changed:
            body["state"] = changed
        actor_seq = self._last_seq.get(str(entry.get("actor", "")))
        if actor_seq is not None:
            body["seq"] = actor_seq  # the chain commits to it: a rolled-back counter is floored at start
        entry_json = canonical_json(body).decode()
        digest = chain_hash(self._audit_key, self._last_hash, entry_json)
        db.execute(
            "INSERT INTO audit (ts, entry, prev_hash, hash) VALUES (?, ?, ?, ?)",
            (ts, entry_json, self._last_hash, digest),
        )
        self._last_hash = digest

    def audit(self, entry: dict[str, Any]) -> None:
        """Append one audit entry in its own transaction (for refusals, which change no state)."""
        with self.transaction() as db:
            self.append_audit(db, entry)

    def audit_entries(self) -> list[tuple[int, str, str, str]]:
        with self._lock:
            return self._db.execute("SELECT seq, entry, prev_hash, hash FROM audit ORDER BY seq").fetchall()

    def policy_problems(self) -> list[str]:
        """Every policy row that differs from the audited state (for `veil keyservice audit`)."""
        entries = self.audit_entries()
        with self._lock:
            rows = current_rows(self._db, self._macs)
        return policy_differences(rows, expected_state(entries))

    # -- principals and sequence numbers --------------------------------------------------
    def principal_key(self, principal_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT public_key FROM principals WHERE id=?", (principal_id,)).fetchone()
        record = rec_principal(principal_id)
        self._check(record, principal_fields(row[0]) if row else None)
        return row[0] if row else None

    def add_principal(self, db: sqlite3.Connection, principal_id: str, public_key: bytes) -> bool:
        cur = db.execute("INSERT OR IGNORE INTO principals VALUES (?, ?, ?)", (principal_id, public_key, time.time()))
        if cur.rowcount == 1:
            self._record(rec_principal(principal_id), principal_fields(public_key))
        return cur.rowcount == 1

    def advance_seq(self, principal_id: str, seq: int) -> bool:
        """Accept `seq` only if it is above every sequence number accepted from this principal."""
        with self._lock:
            if seq <= self._last_seq.get(principal_id, 0):
                return False
            with self.transaction() as db:
                row = db.execute("SELECT last_seq FROM principal_seq WHERE principal_id=?", (principal_id,)).fetchone()
                if row is not None and seq <= row[0]:
                    return False
                db.execute(
                    "INSERT INTO principal_seq VALUES (?, ?) ON CONFLICT(principal_id) DO UPDATE SET last_seq=?",
                    (principal_id, seq, seq),
                )
            self._last_seq[principal_id] = seq
            return True

    # -- models and versions --------------------------------------------------------------
    def _model_row(self, db: sqlite3.Connection, model_id: str) -> ModelRecord | None:
        row = db.execute(
            "SELECT owner_id, measurements, current_version, revocation_delay_s FROM models WHERE model_id=?",
            (model_id,),
        ).fetchone()
        record = rec_model(model_id)
        if row is None:
            self._check(record, None)
            return None
        measurements = json.loads(row[1])
        self._check(record, model_fields(row[0], measurements, row[2], row[3]))
        return ModelRecord(model_id, row[0], measurements, row[2], row[3])

    def model(self, model_id: str) -> ModelRecord | None:
        with self._lock:
            return self._model_row(self._db, model_id)

    def create_model(self, db: sqlite3.Connection, model_id: str, owner_id: str, delay: int) -> bool:
        """Create a model owned by `owner_id`; False if it already exists (owned by anyone)."""
        now = time.time()
        cur = db.execute(
            "INSERT OR IGNORE INTO models (model_id, owner_id, measurements, created, updated, revocation_delay_s) "
            "VALUES (?, ?, '[]', ?, ?, ?)",
            (model_id, owner_id, now, now, delay),
        )
        if cur.rowcount == 1:
            self._record(rec_model(model_id), model_fields(owner_id, [], 0, delay))
        return cur.rowcount == 1

    def _write_model(self, db: sqlite3.Connection, m: ModelRecord) -> None:
        db.execute(
            "UPDATE models SET measurements=?, current_version=?, revocation_delay_s=?, updated=? WHERE model_id=?",
            (json.dumps(sorted(m.measurements)), m.current_version, m.revocation_delay_s, time.time(), m.model_id),
        )
        self._record(
            rec_model(m.model_id), model_fields(m.owner_id, m.measurements, m.current_version, m.revocation_delay_s)
        )

    def set_model_measurements(self, db: sqlite3.Connection, model_id: str, measurements: list[str]) -> None:
        m = self._model_row(db, model_id)
        assert m is not None
        self._write_model(db, ModelRecord(model_id, m.owner_id, measurements, m.current_version, m.revocation_delay_s))

    def set_revocation_delay(self, db: sqlite3.Connection, model_id: str, delay: int) -> None:
        m = self._model_row(db, model_id)
        assert m is not None
        self._write_model(db, ModelRecord(model_id, m.owner_id, m.measurements, m.current_version, delay))

    def _version_row(self, db: sqlite3.Connection, model_id: str, version: int) -> tuple[VersionRecord, bytes] | None:
        row = db.execute(
            "SELECT digest, sealed_key, state, measurements, revocation_delay_s FROM model_versions "
            "WHERE model_id=? AND version=?",
            (model_id, version),
        ).fetchone()
        record = rec_version(model_id, version)
        if row is None:
            self._check(record, None)
            return None
        measurements = json.loads(row[3]) if row[3] is not None else None
        self._check(record, version_fields(row[0], row[1], row[2], measurements, row[4]))
        return VersionRecord(model_id, version, row[0], row[2], measurements, row[4]), row[1]

    def version(self, model_id: str, version: int) -> VersionRecord | None:
        with self._lock:
            found = self._version_row(self._db, model_id, version)
        return found[0] if found else None

    def latest_version_number(self, db: sqlite3.Connection, model_id: str) -> int:
        row = db.execute("SELECT max(version) FROM model_versions WHERE model_id=?", (model_id,)).fetchone()
        return row[0] or 0

    def stage_version(
        self,
        db: sqlite3.Connection,
        model_id: str,
        version: int,
        digest: str,
        key: bytes,
        measurements: list[str] | None,
        delay: int | None,
    ) -> None:
        sealed = self._sealer.seal(f"models/{model_id}/v{version}/key", key)
        db.execute(
            "INSERT INTO model_versions (model_id, version, digest, sealed_key, state, measurements, "
            "revocation_delay_s, created) VALUES (?, ?, ?, ?, 'staged', ?, ?, ?)",
            (
                model_id,
                version,
                digest,
                sealed,
                json.dumps(sorted(measurements)) if measurements is not None else None,
                delay,
                time.time(),
            ),
        )
        self._record(rec_version(model_id, version), version_fields(digest, sealed, "staged", measurements, delay))

    def _set_version_state(self, db: sqlite3.Connection, model_id: str, version: int, state: str) -> None:
        found = self._version_row(db, model_id, version)
        assert found is not None
        v, sealed = found
        db.execute("UPDATE model_versions SET state=? WHERE model_id=? AND version=?", (state, model_id, version))
        self._record(
            rec_version(model_id, version),
            version_fields(v.digest, sealed, state, v.measurements, v.revocation_delay_s),
        )

    def commit_version(self, db: sqlite3.Connection, model_id: str, version: int) -> ModelRecord:
        """Make a staged version current: its measurements and delay (if it brought any) apply,
        the previous current version is retired."""
        m = self._model_row(db, model_id)
        found = self._version_row(db, model_id, version)
        assert m is not None and found is not None
        v = found[0]
        if m.current_version:
            self._set_version_state(db, model_id, m.current_version, "retired")
        self._set_version_state(db, model_id, version, "current")
        updated = ModelRecord(
            model_id,
            m.owner_id,
            v.measurements if v.measurements is not None else m.measurements,
            version,
            v.revocation_delay_s if v.revocation_delay_s is not None else m.revocation_delay_s,
        )
        self._write_model(db, updated)
        return updated

    def set_card(self, db: sqlite3.Connection, model_id: str, version: int, signed_card_json: str) -> None:
        """Keep the owner-signed card of a version. Not a policy row: its authenticity is the
        owner's signature, which every reader checks, not the KeyService's word."""
        db.execute(
            "UPDATE model_versions SET card=? WHERE model_id=? AND version=?", (signed_card_json, model_id, version)
        )

    def card(self, model_id: str, version: int) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT card FROM model_versions WHERE model_id=? AND version=?", (model_id, version)
            ).fetchone()
        return row[0] if row else None

    def current_model_key(self, model_id: str) -> bytes | None:
        """The current version's model key (tools and durability checks; releases use `release_view`)."""
        with self._lock:
            model = self._model_row(self._db, model_id)
            found = self._version_row(self._db, model_id, model.current_version) if model else None
        return self.version_key(model_id, found[0].version, found[1]) if found else None

    def version_key(self, model_id: str, version: int, sealed: bytes) -> bytes:
        return self._open(f"models/{model_id}/v{version}/key", sealed)

    # -- grants ---------------------------------------------------------------------------
    def set_grant(self, db: sqlite3.Connection, model_id: str, user_id: str, granted: bool) -> None:
        now = time.time()
        if granted:
            db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, NULL) ON CONFLICT(model_id, user_id) "
                "DO UPDATE SET granted_at=excluded.granted_at, revoked_at=NULL",
                (model_id, user_id, now),
            )
            self._record(rec_grant(model_id, user_id), grant_fields(True))
        else:
            cur = db.execute("UPDATE grants SET revoked_at=? WHERE model_id=? AND user_id=?", (now, model_id, user_id))
            if cur.rowcount:
                self._record(rec_grant(model_id, user_id), grant_fields(False))

    def _granted(self, db: sqlite3.Connection, model_id: str, user_id: str) -> bool:
        row = db.execute(
            "SELECT revoked_at IS NULL FROM grants WHERE model_id=? AND user_id=?", (model_id, user_id)
        ).fetchone()
        self._check(rec_grant(model_id, user_id), grant_fields(bool(row[0])) if row else None)
        return bool(row and row[0])

    def is_granted(self, model_id: str, user_id: str) -> bool:
        with self._lock:
            return self._granted(self._db, model_id, user_id)

    # -- request keys ---------------------------------------------------------------------
    def put_request_key(
        self,
        db: sqlite3.Connection,
        model_id: str,
        user_id: str,
        key: bytes,
        measurements: list[str],
        max_delay_s: int | None = None,
    ) -> None:
        sealed = self._sealer.seal(f"request_keys/{model_id}/{user_id}", key)
        db.execute(
            "INSERT INTO request_keys (model_id, user_id, sealed_key, measurements, updated, max_delay_s) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(model_id, user_id) DO UPDATE SET "
            "sealed_key=excluded.sealed_key, measurements=excluded.measurements, updated=excluded.updated, "
            "max_delay_s=excluded.max_delay_s",
            (model_id, user_id, sealed, json.dumps(sorted(measurements)), time.time(), max_delay_s),
        )
        self._record(rec_request_key(model_id, user_id), request_key_fields(sealed, measurements, max_delay_s))

    def delete_request_key(self, db: sqlite3.Connection, model_id: str, user_id: str) -> bool:
        deleted = (
            db.execute("DELETE FROM request_keys WHERE model_id=? AND user_id=?", (model_id, user_id)).rowcount == 1
        )
        if deleted:
            self._record(rec_request_key(model_id, user_id), None)
        return deleted

    def _request_key_row(self, db: sqlite3.Connection, model_id: str, user_id: str) -> tuple | None:
        row = db.execute(
            "SELECT sealed_key, measurements, max_delay_s FROM request_keys WHERE model_id=? AND user_id=?",
            (model_id, user_id),
        ).fetchone()
        record = rec_request_key(model_id, user_id)
        if row is None:
            self._check(record, None)
            return None
        measurements = json.loads(row[1])
        self._check(record, request_key_fields(row[0], measurements, row[2]))
        return row[0], measurements, row[2]

    def request_key(self, model_id: str, user_id: str) -> tuple[bytes, list[str]] | None:
        with self._lock:
            row = self._request_key_row(self._db, model_id, user_id)
        if row is None:
            return None
        return self._open(f"request_keys/{model_id}/{user_id}", row[0]), row[1]

    # -- a release, read whole --------------------------------------------------------------
    def release_view(self, model_id: str, user_id: str) -> ReleaseView:
        """Model, current version and its key, grant and request key in one read transaction, so
        a revoke cannot land between them; every row checked against the audited state."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                model = self._model_row(self._db, model_id)
                version = sealed_mk = None
                if model is not None and model.current_version:
                    found = self._version_row(self._db, model_id, model.current_version)
                    if found is None:
                        raise StoreIntegrityError(f"model {model_id!r}: current version row is missing")
                    version, sealed_mk = found
                granted = model is not None and self._granted(self._db, model_id, user_id)
                request = self._request_key_row(self._db, model_id, user_id) if granted else None
            finally:
                self._db.execute("COMMIT")
        return ReleaseView(
            model=model,
            version=version,
            model_key=self.version_key(model_id, version.version, sealed_mk) if version and sealed_mk else None,
            granted=granted,
            request_key=self._open(f"request_keys/{model_id}/{user_id}", request[0]) if request else None,
            user_measurements=request[1] if request else [],
            user_max_delay_s=request[2] if request else None,
        )

    # -- service secrets ------------------------------------------------------------------
    def service_secret(self, name: str, create: Any) -> bytes:
        """Load a sealed service secret, creating it with `create()` on first use."""
        with self.transaction() as db:
            row = db.execute("SELECT sealed FROM service_secrets WHERE name=?", (name,)).fetchone()
            if row:
                return self._open(f"service/{name}", row[0])
            value = create()
            db.execute("INSERT INTO service_secrets VALUES (?, ?)", (name, self._sealer.seal(f"service/{name}", value)))
            return value


def verify_audit_chain(entries: list[tuple[int, str, str, str]], audit_key: SymmetricKey) -> tuple[bool, str]:
    """Walk the chain; (False, where) at the first removed, reordered or altered entry."""
    prev = GENESIS
    expected_seq = None
    for seq, entry_json, prev_hash, digest in entries:
        if expected_seq is not None and seq != expected_seq:
            return False, f"entry {expected_seq} is missing (next is {seq})"
        if prev_hash != prev:
            return False, f"entry {seq}: previous-hash link broken (an entry before it was removed or altered)"
        if not hmac.compare_digest(chain_hash(audit_key, prev_hash, entry_json), digest):
            return False, f"entry {seq}: content does not match its hash (altered)"
        prev, expected_seq = digest, seq + 1
    return True, f"{len(entries)} entries, chain intact"
