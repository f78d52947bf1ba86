"""The chaos soak at its CI size: `veil bench chaos --quick` runs a real deployment under seeded
open-loop load while each fault kind is injected once (instance kill -9, KeyService kill -9 and
restart under a write storm, SIGSTOP past the deadline, a corrupted sealed file, a full queue, a
hostile burst with a cold start during it). It must stop by itself within 90 s of wall time, and
its figures must meet the issue's targets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

WALL_S = 90
KINDS = {"instance_kill", "keyservice_restart", "sigstop", "corrupt_sealed", "full_queue", "hostile"}


def test_chaos_quick_meets_the_targets(tmp_path):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "veil.cli", "bench", "chaos", "--quick", "--json", str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=WALL_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # its `finally` stops the deployment and every instance
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"the quick soak did not stop by itself within {WALL_S} s:\n{stderr[-3000:]}")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, stderr[-4000:]
    assert elapsed <= WALL_S
    r = json.loads(out.read_text())
    why = stderr[-3000:]

    # every fault was injected, once each
    assert {w["kind"] for w in r["windows"]} == KINDS, why
    for w in r["windows"]:
        assert "injection_error" not in w["detail"], (w["kind"], w["detail"], why)
    assert r["sent"] >= 250, r["sent"]
    assert r["he"]["models"], f"HE mode did not run: {r['he']['note']}"

    # the invariants
    assert r["wrong"] == 0, r["overall"]["wrong_examples"]
    assert r["hangs"] == 0, why
    assert r["lost_writes"] == 0 and r["writes"]["audit_exit"] == 0, (r["lost"], r["writes"]["audit"])
    assert r["writes"]["acknowledged"].get("grant", 0) >= 50, r["writes"]  # the storm wrote through the kill
    assert r["overall"]["undeclared_5xx"] == {}, (r["overall"]["errors_by_status"], why)

    # hostile input gets clean 4xx
    (hostile,) = [w for w in r["windows"] if w["kind"] == "hostile"]
    assert hostile["detail"]["hostile"]["clean"], hostile["detail"]["hostile"]["not_clean"]
    assert all(v["clean"] for v in hostile["detail"]["sealed_hostile"].values()), hostile["detail"]

    if r["measurements"]["changed_during_run"]:
        # a shared checkout edited while the soak ran: instances started after the edit measure
        # differently and are (rightly) refused keys, so cold starts cannot be judged
        pytest.skip("the runtime's code changed during the run; the invariants held, rerun on a quiet tree")

    # a cold start works under the flood; a full queue answers a clean busy
    assert hostile["detail"]["cold_start"]["ok"], (hostile["detail"]["cold_start"], why)
    (full,) = [w for w in r["windows"] if w["kind"] == "full_queue"]
    answers = full["detail"]["answers"]
    assert answers.get("busy", 0) > 0 and set(answers) <= {"correct", "busy"}, answers

    # availability and recovery (the 10-minute run asks >= 99 % outside the windows; a CI machine
    # under other load gets a little slack on a sample of ~80 requests)
    assert r["outside_windows"]["correct_fraction"] >= 0.97, (r["outside_windows"], why)
    # the targets (5 s, 10 s) are the 10-minute bench's; a quick run on a loaded CI machine gets headroom
    assert all(v is not None and v <= 8 for v in r["recovery_s"]["instance_kill"]["sustained"]), r["recovery_s"]
    assert all(v is not None and v <= 15 for v in r["recovery_s"]["keyservice_restart"]["sustained"]), r["recovery_s"]
    assert out.with_suffix(".png").stat().st_size > 10_000
