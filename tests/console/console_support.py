"""Helpers of the console tests (the fixtures live in conftest.py): the real `veil` CLI, a
`veil console` process and where Debian's Chromium is.

Playwright's own browser download is not reachable here, so the browser is the `chromium`
package's (`apt-get install -y chromium`), launched through `executable_path`. Without it, or
without the `playwright` package, the browser tests skip and say which is missing.

Every wait is bounded: subprocesses have timeouts, the console's URL must appear within
CONSOLE_START_S, Playwright waits at most BROWSER_TIMEOUT_MS per step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

CLI_TIMEOUT_S = 60
CONSOLE_START_S = 30
BROWSER_TIMEOUT_MS = 30_000
URL_LINE = re.compile(r"open (http://127\.0\.0\.1:(\d+)/#token=([A-Za-z0-9_-]+))")


def chromium_path() -> str | None:
    """Debian's Chromium (or the one VEIL_CHROMIUM names)."""
    for candidate in (os.environ.get("VEIL_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def veil(*args: str) -> str:
    """Run the real `veil` CLI; its stdout, or the test fails with its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"veil {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout.strip()


@dataclass
class Console:
    """A running `veil console` process and the URL (with its token) it printed."""

    process: subprocess.Popen
    url: str
    port: int
    token: str
    output: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_console(client_dir: Path, deployment_json: Path) -> Console:
    """`veil console` for `client_dir`, waiting (bounded) for the URL line it prints."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "veil.cli",
            "console",
            "--client-dir",
            str(client_dir),
            "--deployment",
            str(deployment_json),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()
    match: list[re.Match] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:  # keeps draining after the URL, so the pipe never fills
            lines.append(line.rstrip())
            if not match and (m := URL_LINE.search(line)):
                match.append(m)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(CONSOLE_START_S):
        process.kill()
        raise AssertionError("veil console printed no URL:\n" + "\n".join(lines))
    m = match[0]
    return Console(process, m.group(1), int(m.group(2)), m.group(3), lines)


@dataclass
class Deployed:
    """The embedded deployment and two principals' client directories, as the CLI writes them."""

    root: Path
    deployment_json: Path
    owner_dir: Path
    user_dir: Path
    owner_id: str
    user_id: str
