"""Assemble a KeyService from a state directory and serve it with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

from veil.attest.measurement import measure
from veil.attest.providers import select_provider
from veil.attest.sim import SimRoot
from veil.attest.validate import Policy
from veil.attest.verify import TrustConfig
from veil.crypto.at_rest import Sealer
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey
from veil.keyservice.service import KeyService
from veil.keyservice.store import Store

log = logging.getLogger("veil.keyservice")
GRAMINE_SEALING_KEY = Path("/dev/attestation/keys/_sgx_mrsigner")


def sim_root_path(state_dir: Path) -> Path:
    """Where the simulated TEE 'hardware' of a deployment lives (its attestation/sealing root)."""
    return Path(state_dir) / "sim-root.key"


def sealing_key(sim_root: SimRoot | None) -> SymmetricKey:
    """The KeyService's sealing key: Gramine's MRSIGNER key in SGX, else the simulated CPU's."""
    if GRAMINE_SEALING_KEY.exists():
        raw = GRAMINE_SEALING_KEY.read_bytes()
        return derive_key(SymmetricKey(raw.ljust(32, b"\0")[:32]), b"veil keyservice sealing", b"")
    if sim_root is None:
        raise RuntimeError("no TEE sealing key available and simulation is off")
    return sim_root.sealing_key("keyservice")


def build_keyservice(state_dir: Path, *, allow_simulated: bool, durability: str = "normal") -> KeyService:
    """A KeyService whose database is `state_dir/keyservice.db`.

    `allow_simulated` decides whether runtimes may attest with simulated evidence; it is off by
    default in `veil keyservice serve` and on in the embedded `veil up`/`veil demo`, loudly logged.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    sim_root = SimRoot.load_or_create(sim_root_path(state_dir)) if allow_simulated else None
    key = sealing_key(sim_root)
    store = Store(
        state_dir / "keyservice.db", Sealer(key), derive_key(key, b"veil audit chain", b""), durability=durability
    )
    provider = select_provider(sim_root=sim_root, measurement=measure("keyservice"))
    trust = TrustConfig(sim_roots=[sim_root.public_key] if sim_root else [])
    policy = Policy(allow_simulated=allow_simulated)
    return KeyService(store, provider, trust, policy)


def serve(ks: KeyService, host: str, port: int) -> None:
    import uvicorn

    from veil.keyservice.api import create_app

    uvicorn.run(create_app(ks), host=host, port=port, log_level="warning", access_log=False)
