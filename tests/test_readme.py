"""The README's "Step by step" block, executed as written in a fresh directory (only `veil up`,
which the README runs in its own terminal, goes to the background), so the README cannot drift
from the CLI."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def step_by_step() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Step by step") :]
    block = re.search(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert block, "no bash block under Step by step"
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.timeout(300)
def test_step_by_step_runs_as_written(tmp_path: Path) -> None:
    lines = step_by_step()
    assert lines[0].startswith("veil up")
    for port in (8600, 8700):  # the README's defaults
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"the README's `veil up` uses port {port}, which something on this machine already holds")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    up = subprocess.Popen(
        lines[0].split("#")[0].split(),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / ".veil" / "deployment.json").exists():
            if up.poll() is not None:
                output = up.stdout.read() if up.stdout else ""
                if "already in use" in output:  # taken after the probe, by another process here
                    pytest.skip(f"the README's ports were taken meanwhile: {output.strip()}")
                raise AssertionError(f"veil up exited: {output}")
            assert time.monotonic() < deadline, "veil up did not write deployment.json"
            time.sleep(0.2)
        script = "set -euo pipefail\n" + "\n".join(lines[1:]) + "\n"
        result = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert "Traceback" not in result.stderr
        out = result.stdout
        assert "published cancer v1" in out and "published cancer v2 (replaces v1)" in out
        assert '"label"' in out and (tmp_path / "predictions.csv").exists()
        assert "policy rows OK" in result.stderr and "chain OK" in result.stderr
        assert "gateway" in out and "GB-s" in out and "cancer v2" in out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
