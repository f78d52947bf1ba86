"""Serve the console on 127.0.0.1 only, on the port asked for or a random free one.

The socket is bound here, before the app exists, so the Host and Origin checks know the real
port and no other process can take it between choosing and binding.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from veil.console.app import create_app
from veil.console.context import ConsoleContext
from veil.console.guard import AccessGuard

BIND_HOST = "127.0.0.1"  # loopback only, whatever else the machine has: the console holds the principal's keys


def bind(port: int = 0) -> socket.socket:
    """A listening loopback socket (port 0: the kernel picks a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((BIND_HOST, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def serve(ctx: ConsoleContext, sock: socket.socket, *, on_ready: Callable[[AccessGuard], None]) -> None:
    """Run until SIGINT/SIGTERM; `on_ready` gets the guard (whose `url()` the principal opens)."""
    guard = AccessGuard(sock.getsockname()[1])
    app = create_app(ctx, guard)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    on_ready(guard)
    try:
        server.run(sockets=[sock])
    finally:
        ctx.close()
