"""SQLite persistence of the KeyService (WAL, versioned migrations, key material sealed at rest).

One connection guarded by a lock: every operation is a few hundred microseconds, and a single
writer keeps the audit chain's order total. WAL with synchronous=NORMAL survives a `kill -9`
with every committed transaction (commits reach the OS before they are acknowledged);
`durability="full"` also fsyncs each commit, for power loss.
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
]


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    owner_id: str
    has_key: bool
    measurements: list[str]


@dataclass(frozen=True)
class RequestKeyRecord:
    measurements: list[str]
    sealed_key: bytes


def chain_hash(audit_key: SymmetricKey, prev_hash: str, entry_json: str) -> str:
    """HMAC-SHA256 link: without the sealing-derived audit key nobody can re-forge the chain."""
    return hmac.new(audit_key.material(), prev_hash.encode() + b"\n" + entry_json.encode(), hashlib.sha256).hexdigest()


class Store:
    """Typed access to the KeyService database. Secrets go in and out only through `Sealer`."""

    def __init__(self, path: Path, sealer: Sealer, audit_key: SymmetricKey, *, durability: str = "normal") -> None:
        self.path = Path(path)
        self._audit_key = audit_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sealer = sealer
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        row = self._db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        self._last_hash = row[0] if row else GENESIS

    # -- plumbing -------------------------------------------------------------------------
    def _migrate(self) -> None:
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

    def schema_version(self) -> int:
        return self._db.execute("SELECT version FROM schema_version").fetchone()[0]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: either all of it (and its audit entries) lands, or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            saved_hash = self._last_hash
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._last_hash = saved_hash
                raise

    def _open(self, record_key: str, sealed: bytes) -> bytes:
        try:
            return self._sealer.open(record_key, sealed)
        except CryptoError:  # includes a blob cut too short to parse: also tampering, not bad input
            raise StoreIntegrityError(
                f"sealed record {record_key!r} failed authentication: the database was tampered with"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- audit ----------------------------------------------------------------------------
    def append_audit(self, db: sqlite3.Connection, entry: dict[str, Any]) -> None:
        """Append to the hash chain inside the caller's transaction."""
        ts = time.time()
        entry_json = canonical_json({**entry, "ts": round(ts, 6)}).decode()
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

    # -- principals and replay ------------------------------------------------------------
    def principal_key(self, principal_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT public_key FROM principals WHERE id=?", (principal_id,)).fetchone()
        return row[0] if row else None

    def add_principal(self, db: sqlite3.Connection, principal_id: str, public_key: bytes) -> bool:
        cur = db.execute("INSERT OR IGNORE INTO principals VALUES (?, ?, ?)", (principal_id, public_key, time.time()))
        return cur.rowcount == 1

    def use_nonce(self, principal_id: str, nonce: str, window_s: float) -> bool:
        """Record a request nonce; False if it was seen before (a replay)."""
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM nonces WHERE ts < ?", (now - 2 * window_s,))
            cur = db.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?, ?)", (principal_id, nonce, now))
            return cur.rowcount == 1

    # -- models ---------------------------------------------------------------------------
    def model(self, model_id: str) -> ModelRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT model_id, owner_id, sealed_key IS NOT NULL, measurements FROM models WHERE model_id=?",
                (model_id,),
            ).fetchone()
        return ModelRecord(row[0], row[1], bool(row[2]), json.loads(row[3])) if row else None

    def put_model_key(self, db: sqlite3.Connection, model_id: str, owner_id: str, key: bytes) -> bool:
        """Create the model or replace its key; False (nothing written) if another principal owns it."""
        sealed = self._sealer.seal(f"models/{model_id}/key", key)
        now = time.time()
        cur = db.execute(
            "INSERT INTO models (model_id, owner_id, sealed_key, created, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET sealed_key=excluded.sealed_key, updated=excluded.updated "
            "WHERE models.owner_id=excluded.owner_id",
            (model_id, owner_id, sealed, now, now),
        )
        return cur.rowcount == 1

    def set_model_measurements(self, db: sqlite3.Connection, model_id: str, measurements: list[str]) -> None:
        db.execute(
            "UPDATE models SET measurements=?, updated=? WHERE model_id=?",
            (json.dumps(sorted(measurements)), time.time(), model_id),
        )

    def model_key(self, model_id: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT sealed_key FROM models WHERE model_id=?", (model_id,)).fetchone()
        if not row or row[0] is None:
            return None
        return self._open(f"models/{model_id}/key", row[0])

    # -- grants ---------------------------------------------------------------------------
    def set_grant(self, db: sqlite3.Connection, model_id: str, user_id: str, granted: bool) -> None:
        now = time.time()
        if granted:
            db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, NULL) ON CONFLICT(model_id, user_id) "
                "DO UPDATE SET granted_at=excluded.granted_at, revoked_at=NULL",
                (model_id, user_id, now),
            )
        else:
            db.execute("UPDATE grants SET revoked_at=? WHERE model_id=? AND user_id=?", (now, model_id, user_id))

    def is_granted(self, model_id: str, user_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT revoked_at IS NULL FROM grants WHERE model_id=? AND user_id=?", (model_id, user_id)
            ).fetchone()
        return bool(row and row[0])

    # -- request keys ---------------------------------------------------------------------
    def put_request_key(
        self, db: sqlite3.Connection, model_id: str, user_id: str, key: bytes, measurements: list[str]
    ) -> None:
        sealed = self._sealer.seal(f"request_keys/{model_id}/{user_id}", key)
        db.execute(
            "INSERT INTO request_keys VALUES (?, ?, ?, ?, ?) ON CONFLICT(model_id, user_id) DO UPDATE SET "
            "sealed_key=excluded.sealed_key, measurements=excluded.measurements, updated=excluded.updated",
            (model_id, user_id, sealed, json.dumps(sorted(measurements)), time.time()),
        )

    def delete_request_key(self, db: sqlite3.Connection, model_id: str, user_id: str) -> bool:
        return db.execute("DELETE FROM request_keys WHERE model_id=? AND user_id=?", (model_id, user_id)).rowcount == 1

    def request_key(self, model_id: str, user_id: str) -> tuple[bytes, list[str]] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sealed_key, measurements FROM request_keys WHERE model_id=? AND user_id=?", (model_id, user_id)
            ).fetchone()
        if not row:
            return None
        return self._open(f"request_keys/{model_id}/{user_id}", row[0]), json.loads(row[1])

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
