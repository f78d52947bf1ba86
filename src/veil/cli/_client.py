"""Client-side state for `veil owner` / `veil user`: identity and request keys on the
principal's own machine (files created 0600), and the deployment description."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from veil.crypto.identity import Identity
from veil.crypto.keys import SymmetricKey
from veil.errors import VeilError
from veil.sdk import Deployment
from veil.trust import TrustAnchors

DEFAULT_DEPLOYMENT = Path(".veil/deployment.json")
DEFAULT_CLIENT_DIR = Path(".veil/client")


def deployment_option(f):
    return click.option(
        "--deployment",
        "deployment_path",
        type=click.Path(path_type=Path),
        default=DEFAULT_DEPLOYMENT,
        show_default=True,
        help="deployment.json written by `veil up`.",
    )(f)


def client_dir_option(f):
    return click.option(
        "--client-dir",
        type=click.Path(path_type=Path),
        default=DEFAULT_CLIENT_DIR,
        show_default=True,
        help="Where this principal's identity and keys are kept (your machine, not the cloud).",
    )(f)


def load_deployment(path: Path) -> Deployment:
    """The operator's description of where things listen (addresses only; never trusted)."""
    if not path.exists():
        raise click.ClickException(f"{path} not found: start a deployment with `veil up` first (or pass --deployment)")
    try:
        return Deployment.load(path)
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None


def load_trust(client_dir: Path) -> TrustAnchors:
    """This principal's own trust anchors (`veil trust init`)."""
    try:
        return TrustAnchors.load(client_dir)
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_identity(client_dir: Path, role: str, *, create: bool = False) -> Identity:
    path = client_dir / f"{role}.key"
    if path.exists():
        return Identity.from_private_bytes(path.read_bytes())
    if not create:
        raise click.ClickException(f"no {role} identity in {client_dir}: run `veil {role} init` first")
    identity = Identity.generate()
    _write_private(path, identity.to_private_bytes())
    return identity


def load_request_keys(client_dir: Path) -> dict[str, SymmetricKey]:
    path = client_dir / "request-keys.json"
    if not path.exists():
        return {}
    return {m: SymmetricKey(bytes.fromhex(k)) for m, k in json.loads(path.read_text()).items()}


def save_request_keys(client_dir: Path, keys: dict[str, SymmetricKey]) -> None:
    _write_private(
        client_dir / "request-keys.json", json.dumps({m: k.material().hex() for m, k in keys.items()}).encode()
    )


def principal(cls, deployment_path: Path, client_dir: Path, role: str, *, create: bool = False):
    """A ModelOwner/ModelUser from the operator's addresses and this principal's own anchors."""
    deployment, trust = load_deployment(deployment_path), load_trust(client_dir)
    return run_or_fail(lambda: cls(deployment, load_identity(client_dir, role, create=create), trust=trust))


def run_or_fail(fn):
    """Run `fn`; a VeilError becomes a one-line CLI error (code: message), never a traceback."""
    try:
        return fn()
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
