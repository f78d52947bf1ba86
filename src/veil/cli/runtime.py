"""`veil runtime serve`: one runtime instance in the foreground (what the platforms start)."""

from __future__ import annotations

import logging

import click


@click.group("runtime")
def runtime() -> None:
    """Run a Veil runtime instance (OpenWhisk action protocol: POST /init, POST /run)."""


@runtime.command("serve")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--threads", default=4, show_default=True, type=int, help="Requests served concurrently.")
@click.option("--queue", default=32, show_default=True, type=int, help="Requests allowed to wait; beyond: 503 busy.")
def serve(port: int, host: str, threads: int, queue: int) -> None:
    """Serve until stopped. Configure it with POST /init {"value": {"kind": "tee", ...}}."""
    from veil.runtime.action_server import serve as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(port, threads=threads, queue=queue, host=host)
