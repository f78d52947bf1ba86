"""A principal's own trust anchors: what an owner or a user believes, kept on their machine.

The KeyService measurement they expect, the runtime measurements they allow their keys to reach,
whether they accept simulated attestation (off unless they say so) and which simulation roots.
The operator's `deployment.json` gives addresses only; if it carries any of these settings they
must agree with the principal's own, or the client refuses to proceed and names the anchor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.attest.verify import TrustConfig
from veil.errors import VeilError

FILE_NAME = "trust.json"
# Settings an operator-written deployment description must not carry (or must agree on).
ANCHOR_FIELDS = ("keyservice_measurements", "runtime_measurements", "allow_simulated", "sim_root", "sim_roots")


class TrustError(VeilError):
    code, status = "trust_anchor", 400


@dataclass(frozen=True)
class TrustAnchors:
    keyservice_measurements: list[str]
    runtime_measurements: list[str]
    allow_simulated: bool = False
    sim_roots: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keyservice_measurements:
            raise TrustError("trust.keyservice_measurements: at least one expected KeyService measurement is needed")
        if self.sim_roots and not self.allow_simulated:
            raise TrustError("trust.sim_roots: simulation roots given but allow_simulated is false")

    def verifier_trust(self) -> TrustConfig:
        """The verifier configuration: simulation roots only if this principal accepts simulation."""
        return TrustConfig(sim_roots=list(self.sim_roots) if self.allow_simulated else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "keyservice_measurements": self.keyservice_measurements,
            "runtime_measurements": self.runtime_measurements,
            "allow_simulated": self.allow_simulated,
            "sim_roots": [r.hex() for r in self.sim_roots],
        }

    @classmethod
    def from_json(cls, obj: object) -> TrustAnchors:
        if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != 1:
            raise TrustError("trust: expected a version-1 trust anchor object")

        def strings(name: str) -> list[str]:
            value = obj.get(name, [])
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise TrustError(f"trust.{name}: must be a list of measurement strings")
            return list(value)

        allow = obj.get("allow_simulated", False)
        if not isinstance(allow, bool):
            raise TrustError("trust.allow_simulated: must be true or false")
        try:
            roots = [bytes.fromhex(r) for r in strings("sim_roots")]
        except ValueError:
            raise TrustError("trust.sim_roots: must be hex Ed25519 public keys") from None
        if any(len(r) != 32 for r in roots):
            raise TrustError("trust.sim_roots: each root is a 32-byte Ed25519 public key")
        return cls(strings("keyservice_measurements"), strings("runtime_measurements"), allow, roots)

    @classmethod
    def load(cls, client_dir: Path) -> TrustAnchors:
        path = Path(client_dir) / FILE_NAME
        if not path.exists():
            raise TrustError(
                f"{path} not found: set your own trust anchors first (`veil trust init`); "
                "the operator's deployment.json cannot supply them"
            )
        try:
            return cls.from_json(json.loads(path.read_text()))
        except ValueError:
            raise TrustError(f"{path}: not valid JSON") from None

    def save(self, client_dir: Path) -> Path:
        path = Path(client_dir) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        return path

    def check_operator_settings(self, deployment: dict[str, Any], source: str = "deployment.json") -> None:
        """Refuse an operator-written description whose trust settings disagree with ours."""
        ours: dict[str, Any] = {
            "keyservice_measurements": sorted(self.keyservice_measurements),
            "runtime_measurements": sorted(self.runtime_measurements),
            "allow_simulated": self.allow_simulated,
        }
        for name in ANCHOR_FIELDS:
            if name not in deployment or deployment[name] in (None, [], False):
                continue
            value = deployment[name]
            if name in ("sim_root", "sim_roots"):
                theirs = {value} if isinstance(value, str) else set(value if isinstance(value, list) else [value])
                if not theirs <= {r.hex() for r in self.sim_roots} or not self.allow_simulated:
                    raise TrustError(
                        f"{source}: {name} names a simulation root your trust anchors do not trust; "
                        "only your own client configuration decides which roots (and whether simulation) you accept"
                    )
                continue
            want = ours[name]
            got = sorted(value) if isinstance(value, list) else value
            if got != want:
                raise TrustError(
                    f"{source}: {name} is {got!r} but your trust anchors say {want!r}; the operator's file "
                    "gives addresses only and cannot change what you trust"
                )
