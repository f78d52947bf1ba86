"""What a console runs as: this principal's own client directory and the operator's addresses.

Everything a console shows or signs starts here: the identities (`owner.key`, `user.key`), the
trust anchors (`trust.json`) and request keys (`request-keys.json`) exactly as the CLI writes them,
and the deployment's addresses (`deployment.json`, trusted for nothing). The SDK objects built
from them verify the KeyService's attestation before any secret leaves this process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from veil.cli._client import load_request_keys, save_request_keys
from veil.console.ledger import Ledger
from veil.console.usage import UsageRecorder
from veil.crypto.identity import Identity
from veil.errors import VeilError
from veil.sdk import Deployment, ModelOwner, ModelUser
from veil.trust import TrustAnchors

ROLES = ("owner", "user")


class ConsoleSetupError(VeilError):
    """The client directory or deployment description cannot back a console (named, with the fix)."""

    code, status = "console_setup", 400


def _identity(client_dir: Path, role: str) -> Identity | None:
    path = client_dir / f"{role}.key"
    if not path.exists():
        return None
    try:
        return Identity.from_private_bytes(path.read_bytes())
    except ValueError:
        raise ConsoleSetupError(f"{path}: not an identity key written by `veil {role} init`") from None


@dataclass
class ConsoleContext:
    """The principal(s) of one client directory, as SDK objects, plus the console's own records.

    A client directory may hold an owner identity, a user identity or both (the README keeps both
    in `.veil/client`); the console serves whichever it finds. `reader` verifies model cards: the
    user itself, or, for an owner alone, a `ModelUser` sharing the owner's identity (and so its
    sequence counter), because verifying a card is the same check whoever reads it."""

    client_dir: Path
    deployment_path: Path
    deployment: Deployment
    trust: TrustAnchors
    owner: ModelOwner | None
    user: ModelUser | None
    reader: ModelUser
    ledger: Ledger
    usage: UsageRecorder = field(default_factory=UsageRecorder)
    keyservice_state_dir: Path | None = None
    price_per_gb_s: float = 0.0
    _keys_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls,
        client_dir: Path,
        deployment_path: Path,
        *,
        keyservice_state_dir: Path | None = None,
        price_per_gb_s: float = 0.0,
        timeout_s: float = 60.0,
    ) -> ConsoleContext:
        """Load the client directory; refuse, naming the missing piece, what cannot be used."""
        client_dir, deployment_path = Path(client_dir), Path(deployment_path)
        if not deployment_path.exists():
            raise ConsoleSetupError(
                f"{deployment_path} not found: start a deployment with `veil up` (or pass --deployment)"
            )
        deployment = Deployment.load(deployment_path)
        trust = TrustAnchors.load(client_dir)
        identities = {role: _identity(client_dir, role) for role in ROLES}
        if not any(identities.values()):
            raise ConsoleSetupError(
                f"no identity in {client_dir}: run `veil owner init` or `veil user init` with --client-dir {client_dir}"
            )
        owner_id, user_id = identities["owner"], identities["user"]
        owner = ModelOwner(deployment, owner_id, trust=trust, timeout=timeout_s) if owner_id else None
        user = ModelUser(deployment, user_id, trust=trust, timeout=timeout_s) if user_id else None
        if user is not None:
            user.request_keys.update(load_request_keys(client_dir))
        reader = user or ModelUser(deployment, owner_id, trust=trust, timeout=timeout_s)
        return cls(
            client_dir=client_dir,
            deployment_path=deployment_path,
            deployment=deployment,
            trust=trust,
            owner=owner,
            user=user,
            reader=reader,
            ledger=Ledger(client_dir),
            keyservice_state_dir=keyservice_state_dir,
            price_per_gb_s=price_per_gb_s,
        )

    @property
    def roles(self) -> list[str]:
        return [role for role, p in (("owner", self.owner), ("user", self.user)) if p is not None]

    def principals(self) -> dict[str, ModelOwner | ModelUser]:
        return {role: p for role, p in (("owner", self.owner), ("user", self.user)) if p is not None}

    def save_request_keys(self) -> None:
        """Write the user's request keys back where `veil user infer` finds them (merged with
        what the CLI may have written meanwhile)."""
        assert self.user is not None
        with self._keys_lock:
            merged = {**load_request_keys(self.client_dir), **self.user.request_keys}
            save_request_keys(self.client_dir, merged)

    def reload_request_keys(self) -> None:
        """Pick up request keys `veil user request-access` wrote while the console ran."""
        assert self.user is not None
        with self._keys_lock:
            for model, key in load_request_keys(self.client_dir).items():
                self.user.request_keys.setdefault(model, key)

    def close(self) -> None:
        for p in {id(p): p for p in (self.owner, self.user, self.reader) if p is not None}.values():
            p.close()
