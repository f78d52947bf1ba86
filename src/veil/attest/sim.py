"""The `sim` kind: a simulated TEE for development and tests.

A per-deployment simulation root (an Ed25519 key, standing in for the CPU's fused attestation
key) signs the measurement and report data. The verifier accepts it only for roots it was told to
trust, and the validator only where the policy sets `allow_simulated` explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence, VerifiedReport
from veil.crypto.encoding import b64d, b64e, canonical_json
from veil.crypto.errors import CryptoError, MalformedError
from veil.crypto.identity import Identity, principal_id, verify_signature
from veil.crypto.kdf import derive_key
from veil.crypto.keys import SymmetricKey

log = logging.getLogger("veil.attest.sim")
KIND = "sim"
SIGN_CONTEXT = b"veil-sim-evidence-v1\n"


class SimRoot:
    """The simulated hardware of one deployment: signs evidence, derives sealing keys."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self.public_key = identity.public_key
        self.id = identity.id

    @classmethod
    def generate(cls) -> SimRoot:
        return cls(Identity.generate())

    @classmethod
    def load(cls, path: Path) -> SimRoot:
        """Load the root from `path`, which must exist: a node that runs runtimes uses the root its
        deployment distributed (`veil cluster join`), never one it made up itself."""
        return cls(Identity.from_private_bytes(Path(path).read_bytes()))

    @classmethod
    def load_or_create(cls, path: Path) -> SimRoot:
        """Load the root from `path`, creating it (mode 0600) on first use."""
        if path.exists():
            return cls(Identity.from_private_bytes(path.read_bytes()))
        root = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(root._identity.to_private_bytes())
        return root

    def sign(self, body: bytes) -> bytes:
        return self._identity.sign(SIGN_CONTEXT + body)

    def sealing_key(self, label: str) -> SymmetricKey:
        """Like SGX EGETKEY with an MRSIGNER policy: a key only this simulated CPU can derive."""
        seed = SymmetricKey(self._identity.to_private_bytes())
        return derive_key(seed, b"veil sim sealing key", label.encode())

    def __repr__(self) -> str:
        return f"SimRoot(id={self.id[:16]}…)"


class SimProvider:
    """Evidence provider for the simulated TEE: measurement + report data signed by the root."""

    kind = KIND

    def __init__(self, root: SimRoot, measurement: str, *, debug: bool = False) -> None:
        self._root = root
        self.measurement = measurement
        self.debug = debug
        log.warning("SIMULATED attestation in use: evidence is not backed by TEE hardware")

    def describe(self) -> str:
        return f"sim (simulated TEE, root {self._root.id[:16]})"

    def get_evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) > 64:
            raise MalformedError("report_data", "at most 64 bytes")
        body = canonical_json(
            {
                "v": 1,
                "measurement": self.measurement,
                "report_data": b64e(report_data),
                "debug": self.debug,
                "root": self._root.id,
                "issued_at": int(time.time()),
            }
        )
        raw = canonical_json({"body": b64e(body), "sig": b64e(self._root.sign(body))})
        return Evidence(kind=KIND, raw=raw, report_data=report_data)


def verify_sim(evidence: Evidence, trusted_roots: list[bytes]) -> VerifiedReport:
    """Check the signature against the trusted simulation roots and return the report."""
    if evidence.kind != KIND:
        raise VerificationError("kind", "not simulated evidence", expected=KIND, actual=evidence.kind)
    if not trusted_roots:
        raise VerificationError("sim.root", "no simulation root is trusted by this verifier")
    try:
        outer = json.loads(evidence.raw)
        body = b64d(outer["body"], "sim.body")
        sig = b64d(outer["sig"], "sim.sig")
        claims = json.loads(body)
    except (ValueError, KeyError, TypeError, RecursionError, MalformedError) as exc:
        raise VerificationError("sim.raw", f"does not parse ({exc})") from None
    if not isinstance(claims, dict):
        raise VerificationError("sim.body", "must be a JSON object")
    roots = {principal_id(pk): pk for pk in trusted_roots}
    root_pk = roots.get(claims.get("root"))
    if root_pk is None:
        raise VerificationError("sim.root", "signed by a root this verifier does not trust", actual=claims.get("root"))
    try:
        verify_signature(root_pk, SIGN_CONTEXT + body, sig)
    except CryptoError:
        raise VerificationError("sim.sig", "signature does not verify under the simulation root") from None
    try:
        report_data = b64d(claims.get("report_data"), "sim.report_data")
    except MalformedError as exc:
        raise VerificationError("sim.report_data", str(exc)) from None
    measurement = claims.get("measurement")
    if not isinstance(measurement, str) or not isinstance(claims.get("debug"), bool):
        raise VerificationError("sim.body", "measurement or debug missing")
    return VerifiedReport(
        kind=KIND,
        measurement=measurement,
        report_data=report_data,
        debug=claims["debug"],
        claims={"root": claims["root"], "issued_at": claims.get("issued_at")},
    )
