"""`veil up --prewarm N --fork-template`: the deployment it starts keeps N attested spares of the
TEE function, forked from a template, and says so in the platform's metrics; --fork-template is
refused with Ray, whose replicas are not forked from a local template."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"veil up exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} within {timeout} s")
        time.sleep(0.2)


def test_up_with_a_warm_pool_of_forked_spares(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    cmd = [sys.executable, "-m", "veil.cli", "up", "--dir", str(root), "--gateway-port", "0", "--keyservice-port", "0"]
    cmd += ["--policy", "none", "--prewarm", "2", "--fork-template"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(root / "deployment.json", proc, 120)
        gateway = json.loads((root / "deployment.json").read_text())["gateway_url"]
        deadline = time.monotonic() + 90
        while True:
            tee = httpx.get(f"{gateway}/v1/platform/metrics", timeout=10).json()["functions"]["veil-tee"]
            if tee["spares_ready"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert tee["prewarm"] == 2 and tee["fork_template"] is True and tee["spares_ready"] == 2, tee
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_fork_template_is_refused_with_ray(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "veil.cli", "up", "--dir", str(tmp_path), "--platform", "ray", "--fork-template"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "local-platform option" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
