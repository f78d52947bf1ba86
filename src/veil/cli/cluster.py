"""`veil cluster ...`: what a node needs to run a deployment's runtimes.

Under simulated attestation every runtime signs its evidence with the deployment's simulation
root, the file the KeyService made in its state directory (`cloud/keyservice/sim-root.key`). A
runtime only ever loads that file (VEIL_SIM_ROOT), never makes one up: a root created on a worker
would sign evidence no KeyService trusts. So the operator copies the file to each node and installs
it with `veil cluster join`, which checks it, writes it owner-only, and, given the KeyService's
URL, proves it is the root that KeyService runs under. (With real TEE hardware there is no such
file: the CPU vendor's keys play its part.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click


@click.group("cluster")
def cluster() -> None:
    """Prepare nodes for a multi-node deployment (simulated TEE root, checks)."""


def _load_root(path: Path):  # -> veil.attest.sim.SimRoot
    from veil.attest.sim import SimRoot
    from veil.crypto.errors import MalformedError

    try:
        return SimRoot.load(path)
    except FileNotFoundError:
        raise click.ClickException(f"{path}: no such file") from None
    except (OSError, MalformedError) as exc:
        raise click.ClickException(f"{path}: not a simulation root ({exc})") from None


def _check_keyservice(url: str, root) -> str:  # root: veil.attest.sim.SimRoot
    """Verify the KeyService's evidence under `root`; returns its measurement."""
    import httpx

    from veil.attest.errors import AttestationError
    from veil.attest.evidence import Evidence
    from veil.attest.verify import TrustConfig, verify
    from veil.crypto.encoding import b64e

    try:
        body = httpx.get(f"{url.rstrip('/')}/v1/evidence", params={"nonce": b64e(os.urandom(32))}, timeout=10).json()
        report = verify(Evidence.from_json(body["evidence"]), TrustConfig(sim_roots=[root.public_key]))
    except httpx.HTTPError as exc:
        raise click.ClickException(f"KeyService at {url} unreachable: {type(exc).__name__}") from None
    except AttestationError as exc:
        raise click.ClickException(
            f"the KeyService at {url} does not run under this root ({exc}): copy the root file of that "
            "deployment (its cloud/keyservice/sim-root.key)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"KeyService at {url}: unexpected evidence answer ({exc})") from None
    return report.measurement


@cluster.command("join")
@click.argument("root_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--to",
    "target",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to install it on this node: the path runtimes here get as VEIL_SIM_ROOT (default: $VEIL_SIM_ROOT).",
)
@click.option("--keyservice", "keyservice_url", help="Check the root against the KeyService at this URL.")
@click.option("--force", is_flag=True, help="Replace a different root already installed there.")
def join(root_file: Path, target: Path | None, keyservice_url: str | None, force: bool) -> None:
    """Install the deployment's simulation root (ROOT_FILE, copied from the head node) on this node.

    The file is the simulated CPU's private key: copy it over a channel you trust (scp, a
    Kubernetes Secret), as you would any private key."""
    if target is None:
        env = os.environ.get("VEIL_SIM_ROOT")
        if not env:
            raise click.UsageError("give --to PATH (the VEIL_SIM_ROOT of runtimes on this node), or set VEIL_SIM_ROOT")
        target = Path(env)
    root = _load_root(root_file)
    measurement = _check_keyservice(keyservice_url, root) if keyservice_url else None
    if target.exists() and target.resolve() != root_file.resolve():
        installed = _load_root(target)
        if installed.id != root.id and not force:
            raise click.ClickException(
                f"{target} holds another root ({installed.id[:16]}…); --force replaces it, and runtimes "
                "on this node then attest to this deployment only"
            )
    if target.resolve() != root_file.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".sim-root-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(root_file.read_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    click.echo(f"simulation root {root.id[:16]}… installed at {target} (mode 0600)")
    if measurement is not None:
        click.echo(f"the KeyService at {keyservice_url} runs under it (KeyService measurement {measurement[:16]}…)")
    click.echo(f"runtimes on this node: export VEIL_SIM_ROOT={target}")


@cluster.command("root")
@click.option(
    "--dir",
    "root_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".veil"),
    show_default=True,
    help="The deployment's state directory (veil up --dir).",
)
def show_root(root_dir: Path) -> None:
    """Print where this deployment's simulation root is (the file to copy to other nodes)."""
    path = root_dir / "cloud" / "keyservice" / "sim-root.key"
    root = _load_root(path)
    click.echo(f"{path}  (root {root.id[:16]}…): copy it to each node, then `veil cluster join FILE --to PATH`")
