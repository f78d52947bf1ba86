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
@click.argument("onnx_file", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["tee", "he", "hybrid"]),
    default="tee",
    show_default=True,
    help="tee: MODEL is an ONNX file, sealed and run in attested runtimes. he: MODEL is a directory from "
    "`veil he compile --out`, evaluated on CKKS ciphertexts (its weights reach the cloud in clear). "
    "hybrid: the same compiled model, sealed like a TEE model and evaluated on ciphertexts inside "
    "attested runtimes.",
)
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
    mode: str,
    measurements: tuple[str, ...],
    revocation_delay: int | None,
    optimize: bool,
    deployment_path: Path,
    client_dir: Path,
) -> None:
    """Publish MODEL as a new version of MODEL_ID: staged at the KeyService, sealed under a fresh
    model key (HE mode: packed as it is), uploaded with your signature, described by your signed
    card (which names the mode), then made current."""
    if mode == "tee" and not onnx_file.is_file():
        raise click.BadParameter("in tee mode MODEL is an ONNX file", param_hint="MODEL")
    if mode != "tee" and not (onnx_file / "manifest.json").is_file():
        raise click.BadParameter(
            f"in {mode} mode MODEL is a compiled HE model directory (`veil he compile --out DIR`)", param_hint="MODEL"
        )
    if optimize and mode != "tee":
        raise click.BadParameter("--optimize applies to ONNX models (tee mode) only", param_hint="--optimize")
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
                mode=mode,
                allowed_measurements=list(measurements) or None,
                revocation_delay_s=revocation_delay,
                progress=show,
                optimize=optimize,
            )
        )
    replaced = f" (replaces v{result['replaced_version']})" if result["replaced_version"] else ""
    if mode == "tee":
        how = f"{result['plaintext_bytes']} bytes sealed to {result['sealed_bytes']}"
    else:
        how = f"{mode} mode, N={result['poly_modulus_degree']}, {result['uploaded_bytes']} bytes uploaded"
    allowed = ", ".join(m[:16] + "…" for m in result["measurements"])
    click.echo(
        f"published {model_id} v{result['version']}{replaced}: {how}; revocation delay "
        f"{result['revocation_delay_s']} s; allowed measurements {allowed}"
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
