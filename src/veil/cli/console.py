"""`veil console`: a local web page for this principal, backed by its own client directory."""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from pathlib import Path

import click

from veil.cli._client import client_dir_option, deployment_option

# AWS Lambda's x86 list price per GB-second, as a default people recognise; the platform states none
DEFAULT_PRICE_PER_GB_S = 0.0000166667


@click.command("console")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Loopback port to serve on (0: a random free port). The console binds 127.0.0.1 only.",
)
@click.option(
    "--keyservice-state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The KeyService's state directory, to show its verified audit log (default: DIR/cloud/keyservice "
    "beside deployment.json, when the KeyService runs on this machine).",
)
@click.option(
    "--price-per-gb-s",
    type=click.FloatRange(min=0),
    default=DEFAULT_PRICE_PER_GB_S,
    show_default=True,
    help="Price of one GB-second, to turn the platform's GB-s into a bill (default: AWS Lambda's x86 list price).",
)
@click.option(
    "--open",
    "open_browser",
    is_flag=True,
    help="Open the page in this machine's web browser (through a private file, so the token is never on "
    "a command line other users can read).",
)
@deployment_option
@client_dir_option
def console(
    port: int,
    keyservice_state_dir: Path | None,
    price_per_gb_s: float,
    open_browser: bool,
    deployment_path: Path,
    client_dir: Path,
) -> None:
    """Serve a local page showing your models, cards, trust anchors, grants, audit log, usage and
    the platform's instances and bill; owners publish, grant and revoke from it.

    Every action is signed here, with the identity in CLIENT_DIR; the page gets a per-run access
    token in the printed URL. Ctrl-C stops it."""
    from veil.console.context import ConsoleContext
    from veil.console.guard import AccessGuard
    from veil.console.server import bind, serve
    from veil.errors import VeilError

    try:
        ctx = ConsoleContext.open(
            client_dir, deployment_path, keyservice_state_dir=keyservice_state_dir, price_per_gb_s=price_per_gb_s
        )
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    try:
        sock = bind(port)
    except OSError as exc:
        ctx.close()
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

    opened: list[Path] = []  # redirect files written for --open, removed when the console stops

    def ready(guard: AccessGuard) -> None:
        roles = ", ".join(f"{role} {p.id[:16]}…" for role, p in ctx.principals().items())
        click.echo(f"Veil console for {roles} (client dir {client_dir})")
        click.echo(f"  open {guard.url()}")
        click.echo("  the URL carries this run's access token: do not share it. Ctrl-C to stop.")
        if open_browser:
            opened.append(_open_in_browser(guard.url()))

    try:
        serve(ctx, sock, on_ready=ready)
    finally:
        for path in opened:
            shutil.rmtree(path.parent, ignore_errors=True)


def _open_in_browser(url: str) -> Path:
    """Open `url` via a redirect file in a fresh 0700 directory (as Jupyter does): the browser's
    argv, which any local user can list, then names only the file, never the token."""
    import webbrowser

    directory = Path(tempfile.mkdtemp(prefix="veil-console-"))
    page = directory / "open.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'<!doctype html><meta http-equiv="refresh" content="0;url={html.escape(url)}">')
    webbrowser.open(page.as_uri())
    return page
