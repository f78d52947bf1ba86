"""The compiled artifact: fused plan + parameters, split into a server part and a client spec.

Concrete ML's split: the server part (weights, plan, parameters) is what the cloud runs; the
client spec (parameters, input normalisation, layout, which keys to make) is public and is all
a client needs to make keys, encrypt and decrypt. The manifest records N, log2 QP and the
security level the parameters were checked at.

This module loads and saves the artifact and is part of the measured runtime (the HE server
loads models through it); producing one is dev-side work and lives in `veil.he.compile`, so
the compiler, the fusion pass and the trainers stay outside the runtime's measurement.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.crypto.encoding import canonical_json
from veil.he.errors import HEError
from veil.he.packing import LatencyLayout, latency_layout, throughput_splits
from veil.he.params import CKKSParams
from veil.he.plan import Affine, ConvGeometry, FusedLayer, FusedPlan

FORMAT_VERSION = 1


@dataclass
class CompiledModel:
    """A model ready for HE inference: fused plan, CKKS parameters, input normalisation."""

    plan: FusedPlan
    params: CKKSParams
    input_scale: np.ndarray
    name: str = "model"
    meta: dict[str, Any] = field(default_factory=dict)
    latency: str = "auto"  # the latency program (packing.COEFF, ROWS, CONV or BSGS); "auto" picks
    # rows programs: rescale the first layer before its rotate-and-sum (packing.SlotLayer); the
    # parameters were chosen for it, so it is part of the model (absent in older models: False)
    rescale_first: bool = False

    def latency_layout(self) -> LatencyLayout:
        return latency_layout(self.plan, self.params.slots, self.latency, self.rescale_first)

    @property
    def in_dim(self) -> int:
        return self.plan.in_dim

    @property
    def out_dim(self) -> int:
        return self.plan.out_dim

    def rotation_steps(self) -> list[int]:
        return self.latency_layout().rotation_steps()

    def galois_elements(self) -> list[int]:
        """Latency rotations (3**step mod 2N), plus conjugation (2N - 1) if throughput splits."""
        two_n = 2 * self.params.poly_modulus_degree
        elements = {pow(3, s, two_n) for s in self.rotation_steps()}
        if throughput_splits(self.plan):
            elements.add(two_n - 1)
        return sorted(elements)

    def needs_relin(self) -> bool:
        return self.plan.n_squares > 0

    def params_digest(self) -> str:
        return hashlib.sha256(canonical_json(self.params.to_dict())).hexdigest()

    def predict_plain(self, x: np.ndarray) -> np.ndarray:
        """Plaintext scores of exactly the computation the server runs (for checks)."""
        return self.plan.evaluate(np.asarray(x, dtype=np.float64) / self.input_scale)

    def manifest(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "kind": "he",
            "name": self.name,
            "scheme": "ckks",
            "library": "seal-4.1 (tenseal.sealapi)",
            "poly_modulus_degree": self.params.poly_modulus_degree,
            "log2_qp": self.params.log2_qp,
            "security_level": self.params.security,
            "params": self.params.to_dict(),
            "params_digest": self.params_digest(),
            "layers": [
                {"in": lay.affine.in_dim, "out": lay.affine.out_dim, "square": lay.square} for lay in self.plan.layers
            ],
            "depth": self.params.data_levels - 1,
            "ranges": self.plan.ranges,
            "meta": self.meta,
        }

    def client_spec(self) -> dict[str, Any]:
        """Public: everything a client needs (no weights)."""
        return {
            "v": FORMAT_VERSION,
            "name": self.name,
            "params": self.params.to_dict(),
            "params_digest": self.params_digest(),
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "output": self.plan.output,
            "classes": self.plan.classes,
            "input_scale": self.input_scale.tolist(),
            "latency": self.latency_layout().to_spec(),
            "depth_levels": self.params.data_levels,
            "galois_elements": self.galois_elements(),
            "relin": self.needs_relin(),
            "throughput_split": throughput_splits(self.plan),
            "cost": _cost_table(self),
        }

    # --- files ----------------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {"input_scale": self.input_scale}
        for i, layer in enumerate(self.plan.layers):
            arrays[f"w{i}"] = layer.affine.weight
            arrays[f"b{i}"] = layer.affine.bias
        np.savez(directory / "weights.npz", **arrays)
        server = {
            "v": FORMAT_VERSION,
            "squares": [lay.square for lay in self.plan.layers],
            "output": self.plan.output,
            "classes": self.plan.classes,
            "ranges": self.plan.ranges,
            "input_range": self.plan.input_range,
            "latency": self.latency_layout().kind,
            "rescale_first": self.rescale_first,
            "conv": [None if lay.affine.conv is None else lay.affine.conv.to_dict() for lay in self.plan.layers],
        }
        (directory / "plan.json").write_text(json.dumps(server, indent=1))
        (directory / "manifest.json").write_text(json.dumps(self.manifest(), indent=1))
        (directory / "client.json").write_text(json.dumps(self.client_spec(), indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path) -> CompiledModel:
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            server = json.loads((directory / "plan.json").read_text())
            with np.load(directory / "weights.npz", allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError) as exc:
            raise HEError("bad_model", f"compiled model at {directory.name} is unreadable ({exc})", 500) from None
        if manifest.get("v") != FORMAT_VERSION or server.get("v") != FORMAT_VERSION:
            raise HEError("bad_model", "compiled model has an unknown format version", 500)
        convs = server.get("conv") or [None] * len(server["squares"])
        layers = [
            FusedLayer(
                Affine(arrays[f"w{i}"], arrays[f"b{i}"], None if cv is None else ConvGeometry.from_dict(cv)), bool(sq)
            )
            for i, (sq, cv) in enumerate(zip(server["squares"], convs, strict=True))
        ]
        plan = FusedPlan(
            layers, server["output"], list(server["classes"]), list(server["ranges"]), float(server["input_range"])
        )
        return cls(
            plan,
            CKKSParams.from_dict(manifest["params"]),
            arrays["input_scale"],
            manifest["name"],
            manifest.get("meta", {}),
            str(server.get("latency", "bsgs")),
            bool(server.get("rescale_first", False)),
        )


def _cost_table(compiled: CompiledModel) -> dict[str, Any]:
    """Per-request costs the client's packing choice uses (ms for one latency ciphertext, one
    throughput group).

    When the compiler ran the model on real ciphertexts (`meta.measured_ms`, end to end on the
    owner's machine, wire encoding included) those timings are the cost model; otherwise the
    operation-count estimate of `packing.estimate_ms`.
    """
    from veil.he.packing import LATENCY, THROUGHPUT, estimate_ms, throughput_group

    layout = compiled.latency_layout()
    measured = compiled.meta.get("measured_ms") or {}
    return {
        "latency_per_ct": float(
            measured.get("latency_per_ct", estimate_ms(compiled.plan, compiled.params, layout, LATENCY, 1))
        ),
        "samples_per_ct": layout.samples_per_ciphertext,
        "throughput_per_group": float(
            measured.get("throughput_per_group", estimate_ms(compiled.plan, compiled.params, layout, THROUGHPUT, 1))
        ),
        "slots": throughput_group(compiled.params.slots),
        "source": "measured" if measured else "estimated",
    }
