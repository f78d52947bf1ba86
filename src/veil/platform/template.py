"""The platform's side of the fork template (`veil.runtime.template`): start it, fork from it.

A function deployed with `fork_template=True` gets one template process (its own command, run
with `VEIL_FORK_SERVER` naming a Unix socket in a 0700 directory of the platform's). Its
instances are forked from it, so they start with the runtime already imported; each still
measures, attests and generates its keys itself at `/init`, after the fork. The template is
restarted when it dies and replaced when the function's command or environment changes.

`ForkedProcess` stands in for `subprocess.Popen` for such an instance (`pid`, `poll`, `wait`,
`returncode`): the template reaps the child and writes its exit code down the connection the
fork was asked on, which is how the platform waits for a process that is not its own child.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from veil.platform.errors import PlatformError
from veil.wire.lines import read_json_line, send_json_line

#: The fork server's answer is a pid or a short error; more than this is not one.
MAX_ANSWER = 64 * 1024

FORK_SERVER_ENV = "VEIL_FORK_SERVER"  # the runtime reads the same name (veil.runtime.template)


class ForkedProcess:
    """A Popen-like handle on a process the template forked."""

    def __init__(self, pid: int, conn: socket.socket) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._conn = conn
        self._buf = b""
        self._lock = threading.Lock()

    def _take(self, timeout: float | None) -> None:
        """Read what the template sent within `timeout` (0: what is there now)."""
        with self._lock:
            if self.returncode is not None:
                return
            end = None if timeout is None else time.monotonic() + timeout
            while self.returncode is None:
                left = None if end is None else max(0.0, end - time.monotonic())
                ready, _, _ = select.select([self._conn], [], [], left)
                if not ready:
                    return
                try:
                    chunk = self._conn.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:  # the template went away without word: judge by the pid itself
                    if not _alive(self.pid):
                        self.returncode = -9
                        self._conn.close()
                    return
                self._buf += chunk
                for line in self._buf.split(b"\n")[:-1]:
                    with contextlib.suppress(ValueError, AttributeError):
                        code = json.loads(line).get("exit")
                        if isinstance(code, int):
                            self.returncode = code
                            self._conn.close()
                self._buf = self._buf.rsplit(b"\n", 1)[-1]

    def poll(self) -> int | None:
        self._take(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._take(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"forked instance {self.pid}", timeout or 0.0)
        return self.returncode


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


class Template:
    """One template process: `fork(env, log_path)` returns a running instance process."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, *, start_timeout_s: float) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="veil-template-"))  # 0700
        self.socket_path = str(self._dir / "fork.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.started_mono: float | None = None
        self.ready_s: float | None = None
        self.starts = 0
        self._last_attempt = 0.0

    def retry_due(self, backoff_s: float = 5.0) -> bool:
        """Whether a (re)start may be tried now: a template that keeps failing is not respawned
        at every reaper tick."""
        return time.monotonic() - self._last_attempt >= backoff_s

    def ensure(self) -> None:
        """Start the template (or a new one if it died) and wait until it takes forks."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None and self.ready_s is not None:
                return
            if self.proc is not None:
                self._stop_locked()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            t0 = self._last_attempt = time.monotonic()
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    self.command,
                    env={**self.env, FORK_SERVER_ENV: self.socket_path},
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            self.started_mono, self.ready_s = t0, None
            self.starts += 1
            deadline = t0 + self.start_timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise PlatformError(
                        "start_failed",
                        f"the fork template exited with code {self.proc.returncode} (log: {self.log_path})",
                    )
                if os.path.exists(self.socket_path):
                    try:
                        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                            s.connect(self.socket_path)  # a connection without a request: ignored
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    self._stop_locked()
                    raise PlatformError(
                        "start_failed", f"the fork template did not start in time (log: {self.log_path})"
                    )
                time.sleep(0.01)
            self.ready_s = time.monotonic() - t0

    def fork(self, env: dict[str, str], log_path: Path, timeout: float = 10.0) -> ForkedProcess:
        """A new instance process with environment `env`, output to `log_path`."""
        self.ensure()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(timeout)
            conn.connect(self.socket_path)
            send_json_line(conn, {"env": env, "log": str(log_path)})
            answer, rest = read_json_line(conn, MAX_ANSWER)
        except (OSError, ValueError) as e:
            conn.close()
            raise PlatformError("start_failed", f"the fork template did not fork: {e}") from None
        pid = answer.get("pid") if isinstance(answer, dict) else None
        if not isinstance(pid, int):
            conn.close()
            raise PlatformError("start_failed", f"the fork template refused: {str(answer)[:200]}")
        conn.settimeout(None)
        proc = ForkedProcess(pid, conn)
        proc._buf = rest
        return proc

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _stop_locked(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def close(self) -> None:
        with self._lock:
            self._stop_locked()
        shutil.rmtree(self._dir, ignore_errors=True)
