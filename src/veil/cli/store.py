"""`veil store ...`: the sealed-model store service every node reads, and a look inside a store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click


@click.group("store")
def store() -> None:
    """The model store: an untrusted service holding only sealed (encrypted) models."""


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if len(token) < 16:
        raise click.ClickException(f"{path}: the write token must be at least 16 characters")
    return token


@store.command("serve")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory of the store (its models/ folder holds the sealed files).",
)
@click.option("--backend", help="Another store to serve instead of --root: s3://bucket[/prefix].")
@click.option("--create", is_flag=True, help="Create the directory (or bucket) if it does not exist.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0: every interface).")
@click.option("--port", default=8900, show_default=True, type=int)
@click.option("--max-bytes", default=2 << 30, show_default=True, type=int, help="Largest sealed file accepted.")
@click.option(
    "--write-token-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="File holding the bearer token writers must send. Without it writes are open to anyone who reaches "
    "the port (reads always are: the store holds only ciphertext).",
)
@click.option(
    "--s3-endpoint-url", help="S3-compatible endpoint for --backend s3:// (default: AWS, or AWS_ENDPOINT_URL)."
)
def serve(
    root: Path | None,
    backend: str | None,
    create: bool,
    host: str,
    port: int,
    max_bytes: int,
    write_token_file: Path | None,
    s3_endpoint_url: str | None,
) -> None:
    """Serve a model store over HTTP: versioned sealed files, range reads, staged uploads.

    Runtimes on every node read it with `"store": "http://HOST:PORT"` in their init value; the
    gateway writes to it (`veil up --store http://HOST:PORT`). A store that does not exist is an
    error: give --create once to make it."""
    from veil.errors import VeilError
    from veil.store.client import open_store
    from veil.store.server import serve as serve_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (root is None) == (backend is None):
        raise click.UsageError("give exactly one of --root DIR or --backend s3://bucket[/prefix]")
    options = {"endpoint_url": s3_endpoint_url} if s3_endpoint_url else {}
    try:
        location = str(root) if root is not None else str(backend)
        if location.startswith(("http://", "https://")):
            raise click.UsageError("--backend must be s3://...; an HTTP store is already a service")
        backend_store = open_store(location, create=create, **options)
    except VeilError as exc:
        raise click.ClickException(f"{exc.message} (give --create to make a new store)") from None
    except (ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"model store {backend_store!r} on http://{host}:{port}", err=True)
    serve_store(backend_store, host, port, max_bytes=max_bytes, write_token=_read_token(write_token_file))


@store.command("ls")
@click.argument("location")
@click.argument("models", nargs=-1)
def ls(location: str, models: tuple[str, ...]) -> None:
    """Versions held for MODELS in the store at LOCATION (a directory, http(s)://, s3://)."""
    from veil.errors import VeilError
    from veil.store.client import open_store

    try:
        s = open_store(location)
        answer = {model: s.versions(model) for model in models}
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    except (ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"store": repr(s), "versions": answer}, indent=2))
