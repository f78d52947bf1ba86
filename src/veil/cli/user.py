"""`veil user ...`: the model user's steps, one command each."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from veil.cli._client import (
    client_dir_option,
    deployment_option,
    load_request_keys,
    principal,
    run_or_fail,
    save_request_keys,
)


def _user(deployment_path: Path, client_dir: Path, *, create: bool = False):
    from veil.sdk import ModelUser

    u = principal(ModelUser, deployment_path, client_dir, "user", create=create)
    u.request_keys.update(load_request_keys(client_dir))
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


def _load_input(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix in (".csv", ".txt"):
        return np.atleast_2d(np.loadtxt(path, delimiter=",", dtype=np.float32))
    if path.suffix == ".json":
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    raise click.BadParameter("input must be .npy, .csv or .json", param_hint="--input")


@user.command("infer")
@click.argument("model_id")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Input rows: .npy, .csv or .json (a list of rows).",
)
@click.option("--input-name", default="input", show_default=True, help="Name of the model's input tensor.")
@deployment_option
@client_dir_option
def infer(model_id: str, input_path: Path, input_name: str, deployment_path: Path, client_dir: Path) -> None:
    """Encrypt the input, run MODEL_ID on it in an attested runtime, decrypt and print the outputs."""
    u = _user(deployment_path, client_dir)
    x = _load_input(input_path)
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    outputs = run_or_fail(lambda: u.infer(model_id, x, input_name=input_name))
    click.echo(json.dumps({k: v.tolist() for k, v in outputs.items()}))
    click.echo(f"round trip {u.last_timings.get('round_trip_ms', 0):.1f} ms", err=True)
