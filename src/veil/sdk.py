"""Python SDK: `ModelOwner` and `ModelUser`.

Both verify the KeyService's attestation before sending it any secret (`PrincipalClient`), and
talk to the untrusted gateway only in ciphertext: sealed model files and request envelopes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from veil.attest.verify import TrustConfig
from veil.crypto import chunked
from veil.crypto.envelope import Envelope, new_request_id, open_envelope, seal
from veil.crypto.errors import IntegrityError
from veil.crypto.identity import Identity
from veil.crypto.keys import SymmetricKey
from veil.errors import BadRequest, Unavailable, VeilError
from veil.keyservice.client import PrincipalClient
from veil.runtime import tensors


@dataclass(frozen=True)
class Deployment:
    """Where a Veil deployment listens and what its trusted parts must measure to.

    `sim_root` is the public key of the deployment's simulated TEE root; clients trust it only
    when `allow_simulated` is set (development deployments such as `veil up`).
    """

    gateway_url: str
    keyservice_url: str
    keyservice_measurements: list[str]
    runtime_measurements: list[str]
    sim_root: bytes | None = None
    allow_simulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def trust(self) -> TrustConfig:
        return TrustConfig(sim_roots=[self.sim_root] if (self.sim_root and self.allow_simulated) else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway_url": self.gateway_url,
            "keyservice_url": self.keyservice_url,
            "keyservice_measurements": self.keyservice_measurements,
            "runtime_measurements": self.runtime_measurements,
            "sim_root": self.sim_root.hex() if self.sim_root else None,
            "allow_simulated": self.allow_simulated,
            **self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Deployment:
        known = {
            "gateway_url",
            "keyservice_url",
            "keyservice_measurements",
            "runtime_measurements",
            "sim_root",
            "allow_simulated",
        }
        return cls(
            gateway_url=obj["gateway_url"],
            keyservice_url=obj["keyservice_url"],
            keyservice_measurements=list(obj["keyservice_measurements"]),
            runtime_measurements=list(obj["runtime_measurements"]),
            sim_root=bytes.fromhex(obj["sim_root"]) if obj.get("sim_root") else None,
            allow_simulated=bool(obj.get("allow_simulated")),
            extra={k: v for k, v in obj.items() if k not in known},
        )

    @classmethod
    def load(cls, path: Path) -> Deployment:
        return cls.from_json(json.loads(Path(path).read_text()))


def _gateway_error(response: httpx.Response) -> VeilError:
    try:
        err = response.json().get("error", {})
    except ValueError:
        err = {}
    return VeilError(
        err.get("message", f"gateway answered HTTP {response.status_code}"),
        code=err.get("code", "gateway_error"),
        status=response.status_code,
    )


class _Principal:
    def __init__(self, deployment: Deployment, identity: Identity | None = None, *, timeout: float = 120.0) -> None:
        self.deployment = deployment
        self.identity = identity or Identity.generate()
        self.keyservice = PrincipalClient(
            deployment.keyservice_url,
            self.identity,
            expected_measurements=set(deployment.keyservice_measurements),
            trust=deployment.trust(),
            allow_simulated=deployment.allow_simulated,
        )
        self.gateway = httpx.Client(base_url=deployment.gateway_url, timeout=timeout)

    @property
    def id(self) -> str:
        return self.identity.id

    def register(self) -> str:
        """Verify the KeyService's attestation, then register this principal's public key."""
        self.keyservice.connect()
        return self.keyservice.register()

    def close(self) -> None:
        self.keyservice.close()
        self.gateway.close()


class ModelOwner(_Principal):
    """Seals models, uploads the ciphertext, gives the model key to the attested KeyService."""

    def publish(
        self, model_id: str, onnx: bytes | Path, *, allowed_measurements: list[str] | None = None
    ) -> dict[str, Any]:
        """Encrypt the model under a fresh model key, upload it, register key and measurements."""
        data = Path(onnx).read_bytes() if isinstance(onnx, Path) else onnx
        key = SymmetricKey.generate()
        sealed = chunked.seal_bytes(key, data, model=model_id)
        try:
            response = self.gateway.put(
                f"/v1/models/{model_id}/sealed", content=sealed, headers={"content-type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise Unavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if not response.is_success:
            raise _gateway_error(response)
        measurements = (
            allowed_measurements if allowed_measurements is not None else self.deployment.runtime_measurements
        )
        self.keyservice.put_model_key(model_id, key, measurements)
        return {
            "model": model_id,
            "plaintext_bytes": len(data),
            "sealed_bytes": len(sealed),
            "measurements": measurements,
        }

    def set_measurements(self, model_id: str, measurements: list[str]) -> None:
        self.keyservice.set_measurements(model_id, measurements)

    def grant(self, model_id: str, user_id: str) -> None:
        self.keyservice.grant(model_id, user_id)

    def revoke(self, model_id: str, user_id: str) -> None:
        """Takes effect within the runtime key-cache TTL (60 s by default)."""
        self.keyservice.revoke(model_id, user_id)


class ModelUser(_Principal):
    """Registers request keys and runs encrypted inference."""

    def __init__(self, deployment: Deployment, identity: Identity | None = None, *, timeout: float = 120.0) -> None:
        super().__init__(deployment, identity, timeout=timeout)
        self.request_keys: dict[str, SymmetricKey] = {}
        self.last_timings: dict[str, Any] = {}

    def request_access(
        self, model_id: str, *, allowed_measurements: list[str] | None = None, key: SymmetricKey | None = None
    ) -> None:
        """Make (or reuse) a request key for `model_id` and give it to the KeyService, releasable
        only to runtimes whose measurement this user allows."""
        key = key or self.request_keys.get(model_id) or SymmetricKey.generate()
        measurements = (
            allowed_measurements if allowed_measurements is not None else self.deployment.runtime_measurements
        )
        self.keyservice.put_request_key(model_id, key, measurements)
        self.request_keys[model_id] = key

    def infer(
        self, model_id: str, inputs: np.ndarray | dict[str, np.ndarray], *, input_name: str = "input"
    ) -> dict[str, np.ndarray]:
        """Encrypt `inputs`, send them, decrypt and return the model's named outputs."""
        key = self.request_keys.get(model_id)
        if key is None:
            raise BadRequest(f"no request key for model {model_id!r}: call request_access first", code="no_request_key")
        named = inputs if isinstance(inputs, dict) else {input_name: inputs}
        request_id = new_request_id()
        envelope = seal(
            key, tensors.encode(named), model=model_id, user=self.id, request_id=request_id, direction="request"
        )
        t0 = time.perf_counter()
        try:
            response = self.gateway.post(f"/v1/models/{model_id}:infer", json=envelope.to_json())
        except httpx.HTTPError as exc:
            raise Unavailable(f"gateway unreachable: {type(exc).__name__}") from None
        if not response.is_success:
            raise _gateway_error(response)
        body = response.json()
        answer = Envelope.from_json(body.get("envelope"))
        try:
            plaintext = open_envelope(
                key, answer, model=model_id, user=self.id, direction="response", request_id=request_id
            )
        except IntegrityError:
            raise VeilError(
                "response does not authenticate (tampered or swapped)", code="integrity", status=502
            ) from None
        self.last_timings = {**body.get("timings", {}), "round_trip_ms": (time.perf_counter() - t0) * 1e3}
        return tensors.decode(plaintext)

    def sealed_request(self, model_id: str, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, Any]]:
        """(request id, envelope JSON) without sending: for tests and tools that replay or tamper."""
        request_id = new_request_id()
        env = seal(
            self.request_keys[model_id],
            tensors.encode(inputs),
            model=model_id,
            user=self.id,
            request_id=request_id,
            direction="request",
        )
        return request_id, env.to_json()


__all__ = ["Deployment", "ModelOwner", "ModelUser"]
