"""`kill -9` of a real KeyService process during a burst of writes loses no acknowledged write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from veil.attest.measurement import measure
from veil.attest.sim import SimRoot
from veil.attest.verify import TrustConfig
from veil.crypto.identity import Identity
from veil.crypto.keys import SymmetricKey
from veil.deployment import wait_http
from veil.keyservice.client import PrincipalClient
from veil.keyservice.server import open_store, sim_root_path
from veil.keyservice.store import verify_audit_chain

WRITERS = 4


def start(veil_cli: list[str], state: Path, port: int, log: Path) -> subprocess.Popen:
    """`veil keyservice serve` in its own process; returns once /healthz answers."""
    cmd = [*veil_cli, "keyservice", "serve", "--allow-simulated", "--state-dir", str(state), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 30, proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        raise RuntimeError(f"KeyService did not start ({exc}): {log.read_text()[-2000:]}") from None
    return proc


@pytest.mark.timeout(120)
def test_kill_9_during_write_burst_loses_no_acknowledged_write(
    tmp_path: Path, veil_cli: list[str], free_tcp_port: int
) -> None:
    state, port, log = tmp_path / "ks", free_tcp_port, tmp_path / "ks.log"
    proc = start(veil_cli, state, port, log)
    url = f"http://127.0.0.1:{port}"
    trust = TrustConfig(sim_roots=[SimRoot.load_or_create(sim_root_path(state)).public_key])
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def writer(index: int) -> None:
        client = PrincipalClient(
            url, Identity.generate(), expected_measurements={measure("keyservice")}, trust=trust, allow_simulated=True
        )
        try:
            client.register()
            n = 0
            while not stop.is_set():
                model, key = f"w{index}-{n}", SymmetricKey.generate()
                client.put_model_key(model, key, ["a1" * 32])
                with lock:  # recorded only once the KeyService has acknowledged it
                    acknowledged[model] = key.material()
                n += 1
        except Exception as exc:  # noqa: BLE001 - the kill makes in-flight writes fail; that is the point
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-burst: writers are still sending
    proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 50, f"burst too small ({len(acknowledged)} writes, errors {errors})"
    assert errors, "the writers should have seen the KeyService die mid-burst"

    # Restart on the same state dir: every acknowledged write is there and opens to the same key.
    proc = start(veil_cli, state, port, log)
    try:
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        store = open_store(state, SimRoot.load_or_create(sim_root_path(state)), measure("keyservice"))
        try:
            missing = [m for m, k in acknowledged.items() if store.current_model_key(m) != k]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
            assert verify_audit_chain(store.audit_entries(), store._audit_key)[0]
            assert not store.tampered and store.integrity_failure is None
        finally:
            store.close()
        audit = subprocess.run(
            [*veil_cli, "keyservice", "audit", "--state-dir", str(state)], capture_output=True, text=True
        )
        assert audit.returncode == 0 and "chain OK" in audit.stderr, audit.stderr
        with sqlite3.connect(state / "keyservice.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            put_entries = db.execute("SELECT count(*) FROM audit WHERE entry LIKE '%commit_version%'").fetchone()[0]
        assert put_entries >= len(acknowledged)  # every acknowledged write was audited with it
    finally:
        proc.kill()
        proc.wait(timeout=10)
