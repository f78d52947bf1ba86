"""`veil user ...`: the model user's steps, one command each."""

from __future__ import annotations

from pathlib import Path

import click

from veil.cli._client import (
    client_dir_option,
    deployment_option,
    load_request_keys,
    principal,
    run_or_fail,
    save_request_keys,
)


def _user(deployment_path: Path, client_dir: Path, *, create: bool = False):
    from veil.he.user import HEKeyChain
    from veil.sdk import ModelUser

    u = principal(ModelUser, deployment_path, client_dir, "user", create=create)
    u.request_keys.update(load_request_keys(client_dir))
    u.he_keys = HEKeyChain(u.id, client_dir / "he-keys")  # CKKS keys made once, kept 0600
    return u


@click.group("user")
def user() -> None:
    """Model user: create an identity, register request keys, run encrypted inference."""


@user.command("init")
@deployment_option
@client_dir_option
def init(deployment_path: Path, client_dir: Path) -> None:
    """Create (or reuse) the user identity, verify the KeyService's attestation, register.

    Prints the user id to give to the model owner.
    """
    u = _user(deployment_path, client_dir, create=True)
    run_or_fail(u.register)
    click.echo(u.id)


@user.command("request-access")
@click.argument("model_id")
@click.option(
    "--measurement",
    "measurements",
    multiple=True,
    help="Runtime measurement you allow to receive your request key (repeatable; default: your trust anchors').",
)
@click.option(
    "--max-revocation-delay",
    type=click.IntRange(0, 300),
    default=None,
    help="At most this many seconds may runtimes keep your key cached (the owner's delay or this, the shorter).",
)
@deployment_option
@client_dir_option
def request_access(
    model_id: str,
    measurements: tuple[str, ...],
    max_revocation_delay: int | None,
    deployment_path: Path,
    client_dir: Path,
) -> None:
    """Create a request key for MODEL_ID and give it (HPKE-sealed) to the attested KeyService."""
    u = _user(deployment_path, client_dir)
    run_or_fail(
        lambda: u.request_access(
            model_id, allowed_measurements=list(measurements) or None, max_revocation_delay_s=max_revocation_delay
        )
    )
    save_request_keys(client_dir, u.request_keys)
    click.echo(f"request key registered for {model_id}")


@user.command("infer")
@click.argument("model_id")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Inputs: .csv (header optional), .npy, .npz (one array per model input) or .json "
    "(a list of rows, or a mapping of input names for multi-input models).",
)
@click.option(
    "--input-name",
    default=None,
    help="Input tensor name for a single array (default: the model card's only input, else 'input').",
)
@click.option(
    "--output",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write predictions to .json, .csv or .npz instead of printing JSON.",
)
@click.option(
    "--packing",
    type=click.Choice(["latency", "throughput"]),
    default=None,
    help="HE and hybrid models: how samples are packed into ciphertexts (default: the cost model picks).",
)
@deployment_option
@client_dir_option
def infer(
    model_id: str,
    input_path: Path,
    input_name: str | None,
    output_path: Path | None,
    packing: str | None,
    deployment_path: Path,
    client_dir: Path,
) -> None:
    """Encrypt the input, run MODEL_ID on it, decrypt and print the outputs.

    The model's owner-signed card says the mode: TEE (an attested runtime decrypts and runs it),
    HE (the cloud computes on CKKS ciphertexts under your key, made once and kept in the client
    directory) or hybrid (CKKS ciphertexts evaluated inside an attested runtime). Inputs are
    named, shaped and typed after the card, and a mismatch is explained before anything is sent."""
    from veil.cli.io import InputError, load_inputs, write_outputs
    from veil.errors import VeilError

    u = _user(deployment_path, client_dir)
    try:
        card = u.card(model_id)
    except VeilError as exc:
        if exc.code not in ("no_card",):
            raise click.ClickException(f"{exc.code}: {exc.message}") from None
        card = None
    try:
        x = load_inputs(input_path, card, input_name)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--input") from None
    outputs = run_or_fail(lambda: u.infer(model_id, x, input_name=input_name, packing=packing))
    try:
        text = write_outputs(outputs, output_path)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--output") from None
    if text is not None:
        click.echo(text)
    else:
        click.echo(f"predictions written to {output_path}", err=True)
    click.echo(f"round trip {u.last_timings.get('round_trip_ms', 0):.1f} ms", err=True)
