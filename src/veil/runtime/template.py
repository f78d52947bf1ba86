"""The fork template: one pre-imported runtime process that forks instances on demand.

Most of a cold start from nothing is Python itself: the interpreter, then the runtime's imports
(ONNX Runtime, NumPy, the crypto and KeyService client), about half a second on a loaded host.
None of that is secret or differs between instances, so a platform keeps one template process
that has done it once and forks each new instance from it: the child starts with every module
already loaded and goes straight to listening on its port.

Nothing secret exists before the fork. The template imports code and nothing else: it does not
read the simulation root, build a provider, generate a key, attest or contact the KeyService;
every instance does all of that itself, after the fork, at its own `/init` (`TeeAction`), so
each one has its own ephemeral key pair and its own evidence over a fresh challenge (Python's
`random` and OpenSSL reseed in a forked child; keys come from the kernel's `os.urandom`). The
template is the measured runtime program itself (`python -m veil.runtime` with
`VEIL_FORK_SERVER` set), so the measurement covers it; a fork runs the same code an exec would.
Under SGX (Gramine) an enclave cannot fork this way; there the platform keeps a pool of whole
instances instead (`prewarm` without a template).

Protocol, on a Unix socket only the platform's user can reach (its directory is 0700): the
platform connects and sends one JSON line `{"env": {...}, "log": path}`; the template forks, the
child becomes its own session (so the platform can signal its process group), sends its output
to `log`, replaces its environment with `env` (its `VEIL_PORT`, ids and settings) and serves;
the template answers `{"pid": n}` and keeps the connection open until it reaps the child, then
writes `{"exit": code}` (negative: killed by that signal) and closes it. The platform's end of
that connection is how it waits for the instance like for a child of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
from typing import Any

from veil.wire.lines import read_json_line, send_json_line

log = logging.getLogger("veil.runtime.template")
FORK_SERVER_ENV = "VEIL_FORK_SERVER"
MAX_REQUEST = 1 << 20


def preload() -> None:
    """Import what every instance needs (the TEE action and its dependencies), nothing more."""
    import veil.runtime.tee_action  # noqa: F401


def serve_template(path: str) -> None:
    """Listen on the Unix socket `path` and fork an instance per request, until killed.

    Single-threaded on purpose: a fork copies only the calling thread, so the template runs no
    thread of its own that a child could inherit half-way through a lock."""
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("runtime template ready on %s (pid %d)", path, os.getpid())
    print(f"template ready {os.getpid()}", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        _reap(children)
        if not readable:
            continue
        conn, _ = listener.accept()
        try:
            request = _read_request(conn)
            pid = os.fork()
        except (OSError, ValueError) as exc:
            _send(conn, {"error": f"{type(exc).__name__}: {exc}"[:300]})
            conn.close()
            continue
        if pid == 0:
            listener.close()
            for other in children.values():
                other.close()
            conn.close()
            _become_instance(request)  # never returns
        _send(conn, {"pid": pid})
        children[pid] = conn


def _read_request(conn: socket.socket) -> dict[str, Any]:
    conn.settimeout(5.0)
    request, _ = read_json_line(conn, MAX_REQUEST)
    if not isinstance(request, dict):
        raise ValueError("fork request: must be a JSON object")
    env, log_path = request.get("env"), request.get("log")
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("env: must map strings to strings")
    if not isinstance(log_path, str):
        raise ValueError("log: must be a path")
    return request


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        send_json_line(conn, message)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
            conn.close()


def _become_instance(request: dict[str, Any]) -> None:
    """In the child: a session of its own, its log, its environment, then the instance."""
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        out = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        from veil.runtime.__main__ import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the template's loop
        logging.getLogger("veil.runtime").exception("forked instance failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
