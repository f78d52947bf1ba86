"""The KeyService's audit log, read and verified by `veil keyservice audit`, when it can be.

The log and the key that verifies its hash chain live in the KeyService's state directory
(sealed to the KeyService's measurement), so only its own machine can check it: the embedded
deployment `veil up` runs here. The console runs the audit command itself, as a separate process,
rather than opening the database in-process: the same verified code path as the CLI, and a live
KeyService is never touched by the console's code. Anywhere else the console says why not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.sdk import Deployment

AUDIT_TIMEOUT_S = 30.0
LOOPBACK_HOSTS = ("localhost", "::1")


@dataclass(frozen=True)
class AuditView:
    """What the console can say about the audit log: entries and the verification status, or why not."""

    available: bool
    reason: str
    state_dir: str | None = None
    chain_ok: bool | None = None
    chain_message: str = ""
    policy_ok: bool | None = None
    policy_problems: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, *, tail: int) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "state_dir": self.state_dir,
            "chain_ok": self.chain_ok,
            "chain_message": self.chain_message,
            "policy_ok": self.policy_ok,
            "policy_problems": self.policy_problems,
            "total": len(self.entries),
            # the row MACs under "state" are for the verifier, not for people
            "entries": [
                {"n": n, **{k: v for k, v in e.items() if k != "state"}}
                for n, e in list(enumerate(self.entries, start=1))[-tail:]
            ]
            if tail
            else [],
        }


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host.startswith("127.") or host in LOOPBACK_HOSTS


def locate_state_dir(deployment_path: Path, deployment: Deployment, given: Path | None) -> tuple[Path | None, str]:
    """(state dir, "") where the audit can be read here, else (None, why not)."""
    if given is not None:
        candidate = Path(given)
    elif not _is_loopback(deployment.keyservice_url):
        return None, (
            f"the KeyService runs at {deployment.keyservice_url}, not on this machine: its audit log and the key "
            "that verifies it stay in its state directory there (its operator runs `veil keyservice audit`)"
        )
    else:
        # the layout `veil up --dir ROOT` writes: ROOT/deployment.json beside ROOT/cloud/keyservice
        candidate = Path(deployment_path).resolve().parent / "cloud" / "keyservice"
    database = candidate / "keyservice.db"
    if not database.exists():
        return None, f"no KeyService state directory at {candidate} (pass --keyservice-state-dir if it is elsewhere)"
    if not os.access(database, os.R_OK) or not os.access(candidate, os.R_OK | os.X_OK):
        return None, f"{candidate} is not readable by this user: the audit log belongs to the KeyService's operator"
    return candidate, ""


def parse_audit_output(stdout: str, stderr: str, returncode: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(entries, status) from `veil keyservice audit --json`: one JSON entry a line on stdout; the
    chain's and policy rows' verdicts on stderr; exit 1 on any alteration."""
    entries = []
    for line in stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    chain_ok: bool | None = None
    chain_message, problems, policy_ok = "", [], None
    for line in stderr.splitlines():
        if line.startswith("chain OK: "):
            chain_ok, chain_message = True, line
        elif line.startswith("CHAIN BROKEN: "):
            chain_ok, chain_message = False, line
        elif line.startswith("POLICY ROW ALTERED: "):
            problems.append(line.removeprefix("POLICY ROW ALTERED: "))
        elif line.startswith("policy rows OK"):
            policy_ok = True
    if problems:
        policy_ok = False
    if chain_ok is None:
        chain_ok = False
        chain_message = f"the audit command gave no verdict (exit {returncode}): " + (stderr.strip()[-300:] or "-")
    return entries, {
        "chain_ok": chain_ok,
        "chain_message": chain_message,
        "policy_ok": policy_ok,
        "policy_problems": problems,
    }


def read_audit(deployment_path: Path, deployment: Deployment, given: Path | None) -> AuditView:
    """Run `veil keyservice audit --json` on the state dir, if there is one here to read."""
    state_dir, why_not = locate_state_dir(deployment_path, deployment, given)
    if state_dir is None:
        return AuditView(False, why_not)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "veil.cli", "keyservice", "audit", "--state-dir", str(state_dir), "--json"],
            capture_output=True,
            text=True,
            timeout=AUDIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return AuditView(False, f"`veil keyservice audit` took longer than {AUDIT_TIMEOUT_S:.0f} s", str(state_dir))
    entries, status = parse_audit_output(done.stdout, done.stderr, done.returncode)
    return AuditView(True, "", str(state_dir), entries=entries, **status)
