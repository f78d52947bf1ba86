"""`veil up` owns its ports: a second deployment on ports already in use refuses with a clear
error instead of reporting success (and then talking to the first one's KeyService), and the
start-up check verifies the KeyService's identity, not just that something answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from veil.attest.errors import AttestationError
from veil.attest.measurement import measure
from veil.attest.sim import SimRoot
from veil.deployment import check_own_keyservice


def test_second_up_on_taken_ports_fails_fast(stack, tmp_path):
    ks_port = int(stack.info.keyservice_url.rsplit(":", 1)[1])
    gw_port = int(stack.info.gateway_url.rsplit(":", 1)[1])
    for args, word in (
        (["--keyservice-port", str(ks_port), "--gateway-port", "0"], "KeyService port"),
        (["--keyservice-port", "0", "--gateway-port", str(gw_port)], "gateway port"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "veil.cli", "up", "--dir", str(tmp_path / "second"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, result.stdout
        assert word in result.stderr and "already in use" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "second" / "deployment.json").exists()


def test_a_foreign_keyservice_on_our_port_is_refused(stack):
    """The check a deployment makes at start: evidence from our root, for our measurement."""
    root = SimRoot.load_or_create(stack.deployment.keyservice_dir / "sim-root.key")
    check_own_keyservice(stack.info.keyservice_url, root, measure("keyservice"))  # ours: fine
    with pytest.raises(AttestationError):
        check_own_keyservice(stack.info.keyservice_url, SimRoot.generate(), measure("keyservice"))
    with pytest.raises(AttestationError):
        check_own_keyservice(stack.info.keyservice_url, root, "ee" * 32)
