"""`veil owner ...`: the model owner's steps, one command each."""

from __future__ import annotations

from pathlib import Path

import click

from veil.cli._client import client_dir_option, deployment_option, principal, run_or_fail


def _owner(deployment_path: Path, client_dir: Path, *, create: bool = False):
    from veil.sdk import ModelOwner

    return principal(ModelOwner, deployment_path, client_dir, "owner", create=create)


@click.group("owner")
def owner() -> None:
    """Model owner: create an identity, publish sealed models, set policy, grant and revoke users."""


@owner.command("init")
@deployment_option
@client_dir_option
def init(deployment_path: Path, client_dir: Path) -> None:
    """Create (or reuse) the owner identity, verify the KeyService's attestation, register."""
    o = _owner(deployment_path, client_dir, create=True)
    run_or_fail(o.register)
    click.echo(o.id)


@owner.command("publish")
@click.argument("model_id")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--measurement",
    "measurements",
    multiple=True,
    help="Runtime measurement allowed to receive the model key (repeatable; default: your trust anchors').",
)
@click.option(
    "--revocation-delay",
    type=click.IntRange(0, 300),
    default=None,
    help="Seconds runtimes may keep serving a revoked user (0-300; default 60, or the model's current setting).",
)
@click.option(
    "--optimize",
    is_flag=True,
    help="Convert to ONNX Runtime's ORT format first (graph optimisations done once, here), so runtimes "
    "load it without re-optimising or copying it.",
)
@deployment_option
@client_dir_option
def publish(
    model_id: str,
    onnx_file: Path,
    measurements: tuple[str, ...],
    revocation_delay: int | None,
    optimize: bool,
    deployment_path: Path,
    client_dir: Path,
) -> None:
    """Publish ONNX_FILE as a new version of MODEL_ID: staged at the KeyService, sealed under a
    fresh model key, uploaded with your signature, then made current."""
    o = _owner(deployment_path, client_dir)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True) as bar:
        task = bar.add_task("publishing", total=None)

        def show(step: str, done: int, total: int) -> None:
            bar.update(task, description=step, completed=done, total=total if step == "upload" else None)

        result = run_or_fail(
            lambda: o.publish(
                model_id,
                onnx_file,
                allowed_measurements=list(measurements) or None,
                revocation_delay_s=revocation_delay,
                progress=show,
                optimize=optimize,
            )
        )
    replaced = f" (replaces v{result['replaced_version']})" if result["replaced_version"] else ""
    click.echo(
        f"published {model_id} v{result['version']}{replaced}: {result['plaintext_bytes']} bytes sealed to "
        f"{result['sealed_bytes']}; revocation delay {result['revocation_delay_s']} s; "
        f"allowed measurements {', '.join(m[:16] + '…' for m in result['measurements'])}"
    )


@owner.command("grant")
@click.argument("model_id")
@click.argument("user_id")
@deployment_option
@client_dir_option
def grant(model_id: str, user_id: str, deployment_path: Path, client_dir: Path) -> None:
    """Allow USER_ID (a principal id from `veil user init`) to use MODEL_ID."""
    run_or_fail(lambda: _owner(deployment_path, client_dir).grant(model_id, user_id))
    click.echo(f"granted {user_id[:16]}… on {model_id}")


@owner.command("revoke")
@click.argument("model_id")
@click.argument("user_id")
@deployment_option
@client_dir_option
def revoke(model_id: str, user_id: str, deployment_path: Path, client_dir: Path) -> None:
    """Revoke USER_ID on MODEL_ID (effective within the model's revocation delay, 60 s by default)."""
    run_or_fail(lambda: _owner(deployment_path, client_dir).revoke(model_id, user_id))
    click.echo(f"revoked {user_id[:16]}… on {model_id}")


@owner.command("set-measurements")
@click.argument("model_id")
@click.argument("measurements", nargs=-1, required=True)
@deployment_option
@client_dir_option
def set_measurements(model_id: str, measurements: tuple[str, ...], deployment_path: Path, client_dir: Path) -> None:
    """Replace the runtime measurements allowed to receive MODEL_ID's key."""
    run_or_fail(lambda: _owner(deployment_path, client_dir).set_measurements(model_id, list(measurements)))
    click.echo(f"{model_id}: {len(measurements)} measurement(s) allowed")
