"""Assemble a KeyService from a state directory and serve it with uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from veil.attest.measurement import measure
from veil.attest.providers import select_provider
from veil.attest.sim import SimRoot
from veil.attest.validate import Policy
from veil.attest.verify import TrustConfig
from veil.crypto.at_rest import Sealer
from veil.crypto.errors import CryptoError
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey
from veil.errors import StoreIntegrityError
from veil.keyservice.service import KeyService
from veil.keyservice.store import Store

log = logging.getLogger("veil.keyservice")
GRAMINE_SEALING_KEY = Path("/dev/attestation/keys/_sgx_mrenclave")
DATABASE_KEY_FILE = "database-key.sealed"


def sim_root_path(state_dir: Path) -> Path:
    """Where the simulated TEE 'hardware' of a deployment lives (its attestation/sealing root)."""
    return Path(state_dir) / "sim-root.key"


def sealing_key(sim_root: SimRoot | None, measurement: str) -> SymmetricKey:
    """The KeyService's sealing key, bound to its own measurement (MRENCLAVE-style): Gramine's
    MRENCLAVE key in SGX, else the simulated CPU's key for this measurement. Another enclave of
    the same signer, or a changed KeyService, derives a different key and opens nothing."""
    if GRAMINE_SEALING_KEY.exists():
        raw = GRAMINE_SEALING_KEY.read_bytes()
        return derive_key(SymmetricKey(raw.ljust(32, b"\0")[:32]), b"veil keyservice sealing", b"")
    if sim_root is None:
        raise RuntimeError("no TEE sealing key available and simulation is off")
    return sim_root.sealing_key(f"keyservice/{measurement}")


def _wrap_path(state_dir: Path) -> Path:
    return Path(state_dir) / DATABASE_KEY_FILE


def database_key(state_dir: Path, sealing: SymmetricKey, *, create: bool) -> SymmetricKey:
    """The random key everything in the database is sealed under, itself sealed (AES-GCM) under
    the measurement-bound sealing key in `state_dir/database-key.sealed`.

    Raises StoreIntegrityError if the wrap does not open: the database belongs to a KeyService
    with another measurement (run `veil keyservice migrate`), or the file was tampered with."""
    path = _wrap_path(state_dir)
    sealer = Sealer(sealing)
    if path.exists():
        try:
            return SymmetricKey(sealer.open("database-key", path.read_bytes()))
        except CryptoError:
            raise StoreIntegrityError(
                f"{path}: the database key is sealed to another KeyService measurement (an upgrade needs "
                "`veil keyservice migrate`) or the file was tampered with"
            ) from None
    if not create:
        raise StoreIntegrityError(f"{path} is missing: this state directory has no database key")
    if (Path(state_dir) / "keyservice.db").exists():
        raise StoreIntegrityError(f"{path} is missing but the database exists: refusing to start a new key")
    key = SymmetricKey.generate()
    _write_private(path, sealer.seal("database-key", key.material()))
    return key


def migrate_database_key(state_dir: Path, old: SymmetricKey, new: SymmetricKey) -> None:
    """Re-seal the database key from the old KeyService's sealing key to the new one's.

    Must run inside the *old* measured KeyService (only it can derive `old`); in the simulated TEE
    the simulated CPU derives both. The database itself is not rewritten."""
    path = _wrap_path(state_dir)
    key = database_key(state_dir, old, create=False)
    _write_private(path, Sealer(new).seal("database-key", key.material()))


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_keys(key: SymmetricKey) -> tuple[Sealer, SymmetricKey, SymmetricKey]:
    """(record sealer, audit-chain key, policy-row key) from the database key."""
    return Sealer(key), derive_key(key, b"veil audit chain", b""), derive_key(key, b"veil policy rows", b"")


def open_store(state_dir: Path, sim_root: SimRoot | None, measurement: str, *, durability: str = "normal") -> Store:
    """The KeyService database of `state_dir`, opened with this measurement's sealing key."""
    key = database_key(state_dir, sealing_key(sim_root, measurement), create=True)
    sealer, audit_key, policy_key = store_keys(key)
    return Store(state_dir / "keyservice.db", sealer, audit_key, policy_key=policy_key, durability=durability)


def build_keyservice(
    state_dir: Path, *, allow_simulated: bool, durability: str = "normal", measurement: str | None = None
) -> KeyService:
    """A KeyService whose database is `state_dir/keyservice.db`.

    `allow_simulated` decides whether runtimes may attest with simulated evidence; it is off by
    default in `veil keyservice serve` and on in the embedded `veil up`/`veil demo`, loudly logged.
    `measurement` defaults to this code's own (`measure("keyservice")`); tests pass another to
    stand for a different KeyService build.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    sim_root = SimRoot.load_or_create(sim_root_path(state_dir)) if allow_simulated else None
    measurement = measurement or measure("keyservice")
    store = open_store(state_dir, sim_root, measurement, durability=durability)
    if store.integrity_failure:
        log.error("%s", store.integrity_failure)
    if store.tampered:
        log.error("policy rows changed outside the KeyService (refused until restored): %s", sorted(store.tampered))
    provider = select_provider(sim_root=sim_root, measurement=measurement)
    trust = TrustConfig(sim_roots=[sim_root.public_key] if sim_root else [])
    policy = Policy(allow_simulated=allow_simulated)
    return KeyService(store, provider, trust, policy)


def serve(ks: KeyService, host: str, port: int) -> None:
    import uvicorn

    from veil.keyservice.api import create_app

    uvicorn.run(create_app(ks), host=host, port=port, log_level="warning", access_log=False)
