"""Dev side of HE mode: compile a model (scikit-learn, ONNX, or an unfused `Plan`) into a
`CompiledModel`: fuse, normalise inputs, calibrate ranges, pick CKKS parameters and the latency
program.

Owner-side only (`veil he compile`, the demo, benchmarks). The runtime never imports this
module, so the compiler front ends, the fusion pass and the trainers are outside the runtime's
measurement, and changing them does not ask owners and users to approve a new runtime.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from veil.he.compiled import CompiledModel
from veil.he.compiler import from_onnx, from_sklearn
from veil.he.errors import PlanError
from veil.he.fusion import fuse
from veil.he.packing import COEFF, ROWS, latency_layout
from veil.he.params import CKKSParams, select_params
from veil.he.plan import Affine, FusedLayer, FusedPlan, Plan


def _latency_kind(plan: FusedPlan, params: CKKSParams, latency: str) -> str:
    try:
        return latency_layout(plan, params.slots, latency).kind
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def input_normalisation(x: np.ndarray) -> np.ndarray:
    """Per-feature powers of two >= max |x_i| on the calibration set (public; only magnitudes)."""
    peak = np.max(np.abs(np.asarray(x, dtype=np.float64)), axis=0)
    peak = np.where(peak > 0, peak, 1.0)
    return np.exp2(np.ceil(np.log2(peak)))


def compile_plan(
    plan: Plan,
    x_calib: np.ndarray,
    precision: float = 1e-4,
    poly_modulus_degree: int | None = None,
    name: str = "model",
    margin: float = 2.0,
    latency: str = "auto",
) -> CompiledModel:
    """Fuse, normalise inputs, calibrate ranges on `x_calib`, pick parameters and the latency program."""
    x_calib = np.asarray(x_calib, dtype=np.float64)
    if x_calib.ndim != 2 or x_calib.shape[1] != plan.in_dim:
        raise PlanError(f"calibration data must have shape (n, {plan.in_dim})")
    fused = fuse(plan)
    scale = input_normalisation(x_calib)
    first = fused.layers[0]
    fused.layers[0] = FusedLayer(Affine(first.affine.weight * scale[None, :], first.affine.bias), first.square)
    fused.calibrate(x_calib / scale, margin=margin)
    params = select_params(fused, precision=precision, poly_modulus_degree=poly_modulus_degree)
    kind = _latency_kind(fused, params, latency)
    if kind == COEFF:  # nothing rotates or relinearizes: one prime, often a smaller ring
        params = select_params(fused, precision, poly_modulus_degree, coefficient_packing=True)
    else:  # see select_params: only coeff programs may leave latency's last layer unrescaled
        mode = "throughput-unrescaled" if kind == ROWS else "rescaled"
        params = select_params(fused, precision=precision, poly_modulus_degree=poly_modulus_degree, last_layer=mode)
    meta = {
        "source": plan.source,
        "precision_target": precision,
        "calibration_samples": len(x_calib),
        "unfused_ops": len(plan.ops),
        "fused_layers": len(fused.layers),
        "scale_bits_log2": params.scale_bits,
        "max_range_log2": math.log2(max(fused.ranges)),
    }
    kind = _latency_kind(fused, params, kind)  # the program the parameters were chosen for, or an error
    meta["latency_program"] = kind
    return CompiledModel(fused, params, scale, name, meta, kind)


def compile_model(
    model: Any,
    x_calib: np.ndarray,
    precision: float = 1e-4,
    poly_modulus_degree: int | None = None,
    name: str = "model",
    latency: str = "auto",
) -> CompiledModel:
    """`veil he compile` in Python: a fitted scikit-learn model, ONNX path or ModelProto."""
    if isinstance(model, str | Path) or type(model).__name__ == "ModelProto":
        plan = from_onnx(model)
    else:
        plan = from_sklearn(model)
    return compile_plan(plan, x_calib, precision, poly_modulus_degree, name, latency=latency)
