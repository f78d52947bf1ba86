"""Running a document's commands as a user would: `veil up` in the background (the docs run it in
its own terminal), then the document's other commands in one bash shell, in a fresh directory."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DOC_PORTS = (8600, 8700)  # `veil up`'s defaults, which the docs use as written


def step_by_step(doc: Path) -> list[str]:
    """The non-blank lines of the first bash block under the document's "## Step by step"."""
    text = doc.read_text()
    section = text[text.index("## Step by step") :]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert block, f"no bash block under Step by step in {doc.name}"
    return [line for line in block.group(1).splitlines() if line.strip()]


@contextlib.contextmanager
def veil_up(workdir: Path, argv: list[str], what: str) -> Iterator[dict[str, str]]:
    """Start `veil up` (argv) in `workdir`; yields the environment the document's shell uses.
    Skips (naming the port) if another listener on this machine holds a port the document needs."""
    for port in DOC_PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"{what}'s `veil up` uses port {port}, which something on this machine already holds")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    up = subprocess.Popen(
        argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while not (workdir / ".veil" / "deployment.json").exists():
            if up.poll() is not None:
                output = up.stdout.read() if up.stdout else ""
                if "already in use" in output:  # taken after the probe, by another process here
                    pytest.skip(f"{what}'s ports were taken meanwhile: {output.strip()}")
                raise AssertionError(f"veil up exited: {output}")
            assert time.monotonic() < deadline, "veil up did not write deployment.json"
            time.sleep(0.2)
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


def run_shell(lines: list[str], workdir: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """The lines as one `set -euo pipefail` bash script; asserts it succeeded without a traceback."""
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    result = subprocess.run(
        ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result
