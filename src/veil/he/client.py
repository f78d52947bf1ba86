"""The client: keys, encryption, decryption; and the transports that reach a server.

The client needs only the model's public client spec (`CompiledModel.client_spec()`). It makes
the secret key (which never leaves it), the evaluation keys (uploaded once, cached by key id in
warm instances), encrypts with seeded symmetric encryption (half-size uploads), picks the
packing per request with the cost model, and decrypts. `ActionTransport` calls `HEAction.run`
in-process, the same code an instance runs (benchmarks' in-process baseline, tests); serving
through a gateway is the SDK's (`veil.sdk.ModelUser.infer`, with `veil.he.user`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from veil.he.errors import HEError
from veil.he.keys import eval_key_pieces, key_id
from veil.he.packing import (
    LATENCY,
    THROUGHPUT,
    LatencyLayout,
    throughput_group,
    throughput_pack,
    throughput_unpack,
)
from veil.he.params import CKKSParams
from veil.he.plan import postprocess
from veil.he.seal_backend import SealBackend, SealSecretKey
from veil.he.wire import InferRequest, InferResponse, UploadKeys


@dataclass
class EncryptedBatch:
    packing: str
    batch: int
    features: int
    ciphertexts: list[bytes]


def write_private(path: Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write `data` (bytes, or pieces one after another) readable by this user only (created
    0600, replaced atomically)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        for piece in (data,) if isinstance(data, bytes) else data:
            f.write(piece)
    os.replace(tmp, path)


class HEClient:
    """Key holder for one parameter set (one model's client spec)."""

    def __init__(
        self, spec: dict[str, Any], secret_key: bytes | None = None, eval_keys_file: Path | None = None
    ) -> None:
        """`eval_keys_file`: where the evaluation-key blob lives (written on first use when it is
        absent). With it the blob is read from the file for each upload instead of being held in
        memory: it is tens of MiB per model, needed once per (user, model version)."""
        if not isinstance(spec, dict) or spec.get("v") != 1:
            raise HEError("bad_spec", "not a v1 HE client spec")
        self.spec = spec
        self.params = CKKSParams.from_dict(spec["params"])
        self.backend = SealBackend(self.params)
        self._secret = (
            SealSecretKey(self.backend) if secret_key is None else SealSecretKey.load(self.backend, secret_key)
        )
        try:
            if "latency" in spec:
                self.layout = LatencyLayout.from_spec(spec["latency"], self.params.slots)
            else:  # specs written before the coeff and rows programs
                self.layout = LatencyLayout(n=int(spec["latency_block"]), slots=self.params.slots)
        except (KeyError, TypeError, ValueError) as exc:
            raise HEError("bad_spec", f"client spec has no usable latency layout ({exc})") from None
        self.input_scale = np.asarray(spec["input_scale"], dtype=np.float64)
        self._blob: bytes | None = None
        self._key_id: str | None = None
        self._eval_keys_file = Path(eval_keys_file) if eval_keys_file is not None else None

    def __repr__(self) -> str:
        return f"HEClient(model={self.spec.get('name')!r}, N={self.params.poly_modulus_degree})"

    @property
    def in_dim(self) -> int:
        return int(self.spec["in_dim"])

    @property
    def out_dim(self) -> int:
        return int(self.spec["out_dim"])

    def export_secret_key(self) -> bytes:
        """Secret key bytes for the client's own key file (keep it 0600, never upload it)."""
        return self._secret.export()

    def eval_keys(self) -> bytes:
        """The evaluation-key blob (made once per client, reused for every upload)."""
        if self._blob is not None:
            return self._blob
        path = self._eval_keys_file
        if path is not None and path.is_file():
            return path.read_bytes()
        elements = [int(e) for e in self.spec["galois_elements"]]
        relin, galois = self._secret.eval_keys(elements, bool(self.spec["relin"]))
        pieces = eval_key_pieces(self.spec["params_digest"], elements, relin, galois)
        del relin, galois
        if path is None:
            self._blob = b"".join(pieces)
            return self._blob
        write_private(path, pieces)  # piece by piece: the parts are never joined in memory
        del pieces
        return path.read_bytes()

    @property
    def key_id(self) -> str:
        if self._key_id is None:  # hashing a 10 MiB blob per request would cost milliseconds
            self._key_id = key_id(self.eval_keys())
        return self._key_id

    def choose_packing(self, batch: int) -> str:
        """Cost model: latency blocks per ciphertext vs one full-slot group per feature set."""
        cost = self.spec["cost"]
        lat = math.ceil(batch / cost["samples_per_ct"]) * cost["latency_per_ct"]
        thr = math.ceil(batch / cost["slots"]) * cost["throughput_per_group"]
        return LATENCY if lat <= thr else THROUGHPUT

    def encrypt(self, x: np.ndarray, packing: str | None = None) -> EncryptedBatch:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise HEError("wrong_features", f"expected {self.in_dim} features per sample, got {x.shape[-1]}")
        if not np.all(np.isfinite(x)):
            raise HEError("bad_input", "inputs must be finite")
        packing = packing or self.choose_packing(len(x))
        xs = x / self.input_scale
        scale = 2.0**self.params.scale_bits
        level = 0
        if packing == LATENCY:
            vectors = self.layout.pack(xs)
        elif packing == THROUGHPUT:
            vectors = [v for group in throughput_pack(xs, self.params.slots) for v in group]
            level = self.params.throughput_level
        else:
            raise HEError("bad_request", f"unknown packing {packing!r}")
        cts = [self._secret.encrypt(v, scale, level) for v in vectors]
        return EncryptedBatch(packing, len(x), self.in_dim, cts)

    def decrypt(self, response: InferResponse | EncryptedBatch, packing: str, batch: int) -> np.ndarray:
        """Raw scores (batch, out_dim) from the server's result ciphertexts."""
        if packing == LATENCY:
            vectors = [self._secret.decrypt(c, complex_slots=self.layout.complex_slots) for c in response.ciphertexts]
            expected = math.ceil(batch / self.layout.samples_per_ciphertext)
            if len(vectors) != expected:
                raise HEError("bad_response", f"expected {expected} result ciphertexts, got {len(vectors)}")
            return self.layout.unpack(vectors, batch, self.out_dim)
        vectors = [self._secret.decrypt(c, complex_slots=True) for c in response.ciphertexts]
        group = throughput_group(self.params.slots)
        groups = math.ceil(batch / group)
        split = bool(self.spec.get("throughput_split", False))
        per_group = self.out_dim * (2 if split else 1)
        if len(vectors) != groups * per_group:
            raise HEError("bad_response", "result has the wrong number of ciphertexts")
        rows = [
            throughput_unpack(
                vectors[g * per_group : (g + 1) * per_group], split, self.out_dim, min(group, batch - g * group)
            )
            for g in range(groups)
        ]
        return np.concatenate(rows, axis=0)

    def predict(self, scores: np.ndarray) -> np.ndarray:
        return postprocess(scores, self.spec["output"], self.spec["classes"])


class Transport(Protocol):
    def upload_keys(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def infer(self, model: str, body: dict[str, Any]) -> dict[str, Any]: ...


class ActionTransport:
    """In-process: the value the gateway would forward, handed straight to `HEAction.run`."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def upload_keys(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.action.run({**body, "op": "upload_keys"})

    def infer(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.action.run({**body, "op": "infer", "model": model})


@dataclass
class InferResult:
    scores: np.ndarray
    predictions: np.ndarray
    packing: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    upload_bytes: int = 0


class RemoteModel:
    """A model behind a transport: uploads keys once, re-uploads if an instance lost them."""

    def __init__(self, client: HEClient, transport: Transport, model: str) -> None:
        self.client = client
        self.transport = transport
        self.model = model
        self._uploaded = False

    def upload_keys(self) -> str:
        resp = self.transport.upload_keys(UploadKeys(self.model, self.client.eval_keys()).to_json())
        if resp.get("key_id") != self.client.key_id:
            raise HEError("bad_response", "server computed a different key id")
        self._uploaded = True
        return self.client.key_id

    def infer(self, x: np.ndarray, packing: str | None = None) -> InferResult:
        if not self._uploaded:
            self.upload_keys()
        t0 = time.perf_counter()
        batch = self.client.encrypt(x, packing)
        t1 = time.perf_counter()
        body = InferRequest(
            self.model, self.client.key_id, batch.packing, batch.batch, batch.features, batch.ciphertexts
        ).to_json()
        try:
            raw = self.transport.infer(self.model, body)
        except HEError as exc:
            if exc.code != "unknown_key":
                raise
            self.upload_keys()
            raw = self.transport.infer(self.model, body)
        t2 = time.perf_counter()
        resp = InferResponse.parse(raw)
        scores = self.client.decrypt(resp, batch.packing, batch.batch)
        t3 = time.perf_counter()
        timings = {
            "encrypt": (t1 - t0) * 1e3,
            "server": (t2 - t1) * 1e3,
            "eval": resp.eval_ms,
            "decrypt": (t3 - t2) * 1e3,
        }
        return InferResult(
            scores, self.client.predict(scores), batch.packing, timings, sum(map(len, batch.ciphertexts))
        )
