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

from veil.he.approx import approximate
from veil.he.bounds import analyse, measure_error, verify
from veil.he.compiled import CompiledModel
from veil.he.compiler import from_onnx, from_sklearn
from veil.he.errors import InsecureParametersError, PlanError
from veil.he.fusion import fuse
from veil.he.packing import BSGS, COEFF, CONV, ROWS, latency_layout
from veil.he.params import HE_STD_128, CKKSParams, select_params
from veil.he.plan import Affine, FusedLayer, FusedPlan, Plan

# accept parameters when the measured error is within this fraction of the target (room for the
# tail that calibration samples may not show); otherwise add scale bits and measure again
ACCEPT_FRACTION = 0.7
# scale bits a rows program's rescale-first layer needs over the noise model: its rotations'
# key-switching rounding (~sqrt(N) in coefficients) lands on scale 2**scale_bits instead of the
# product's; measured 10x the error on digits at the same scale (log2 10 ~ 3.3)
RESCALE_FIRST_BITS = 3
# hidden-layer gains (powers of two: exact) the fitted search tries in a smaller ring, in order;
# gains[i] multiplies hidden layer i's output, the next layer's weights divide it back out. A
# larger hidden value dilutes the rescale noise a ciphertext collects at a fixed scale; too large
# and the next layer's vector weights (encoded to 2^-scale) lose precision. Digits mlp3 at
# N=8192, 2^32, latency / throughput: (1,) 3.2e-5 / 8.0e-5, (2,) 1.4-1.7e-5 / 3.9-4.6e-5,
# (4, 2) 2.0-2.1e-5 / 2.1-2.3e-5, (4, 4) 3.2-3.5e-5 / 1.9-2.0e-5, (8, 2) 4.8-4.9e-5 / 1.8-1.9e-5
HIDDEN_GAINS: tuple[tuple[int, ...], ...] = ((1,), (4, 2), (2,), (2, 2))
# a smaller ring whose first measurement misses the target by more than this is not tried further
FIT_GIVE_UP = 16.0


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


def _choose_params(
    fused: FusedPlan, precision: float, n: int | None, latency: str, extra: int
) -> tuple[CKKSParams, str, bool]:
    """Parameters, latency program and whether rows rescales before its first sum.

    coeff when the plan is one affine map that fits a single prime (nothing rotates, so no key
    switching and often a smaller ring), else rows/conv/bsgs. A rows program rescales its first
    layer before the rotate-and-sum (rotations one prime lighter) when the ring still holds the
    `RESCALE_FIRST_BITS` that key switching at the rescaled scale costs; else it rotates first.
    """
    single = len(fused.layers) == 1 and not fused.layers[0].square
    if single and latency in ("auto", COEFF):
        try:
            params = select_params(fused, precision, n, coefficient_packing=True, extra_scale_bits=extra)
            if _latency_kind(fused, params, "auto") == COEFF:
                return params, COEFF, False
        except (PlanError, InsecureParametersError):  # scale + weights + range overflow one prime
            if latency == COEFF:
                raise
        if latency == COEFF:
            raise PlanError("this plan does not fit the coeff latency program")
    rows = _rows_params(fused, precision, n, extra) if latency in ("auto", ROWS) and not single else None
    if latency == ROWS:
        if rows is None:
            raise PlanError("this plan does not fit the rows latency program")
        return rows[0], ROWS, rows[1]
    try:
        params = select_params(fused, precision=precision, poly_modulus_degree=n, extra_scale_bits=extra)
        kind = _latency_kind(fused, params, BSGS if latency == "auto" and single else latency)
        if kind == ROWS:  # rows did not fit its own parameters: the diagonal programs
            kind = CONV if fused.layers[0].affine.conv is not None and len(fused.layers) == 2 else BSGS
        params = select_params(fused, precision, n, "rescaled", extra_scale_bits=extra)
        kind = _latency_kind(fused, params, kind)  # the program the parameters were chosen for, or an error
    except (PlanError, InsecureParametersError):
        if rows is None:
            raise
        return rows[0], ROWS, rows[1]
    if rows is not None and rows[0].poly_modulus_degree <= params.poly_modulus_degree:
        return rows[0], ROWS, rows[1]  # fewer rotations than the diagonal programs in the same ring
    return params, kind, False


def _rows_params(fused: FusedPlan, precision: float, n: int | None, extra: int) -> tuple[CKKSParams, bool] | None:
    """The smallest ring a rows program fits, and whether it rescales first there.

    Rescaling first (rotations one prime lighter, `RESCALE_FIRST_BITS` more scale, a full-size
    special prime) is preferred in the same ring; rotating before the rescale lets the special
    prime be small, which may fit a smaller ring (see `params.PRODUCT_SCALE_SPECIAL_SLACK`).
    """
    options = []
    for rescale_first in (True, False):
        try:
            params = select_params(
                fused,
                precision,
                n,
                "throughput-unrescaled",
                extra_scale_bits=extra + (RESCALE_FIRST_BITS if rescale_first else 0),
                product_scale_switching=not rescale_first,
            )
            _latency_kind(fused, params, ROWS)  # PlanError unless the plan fits rows in this ring
        except (PlanError, InsecureParametersError):
            continue
        options.append((params.poly_modulus_degree, not rescale_first, params, rescale_first))
    if not options:
        return None
    _, _, params, rescale_first = min(options, key=lambda o: (o[0], o[1]))
    return params, rescale_first


def with_hidden_gains(plan: FusedPlan, gains: tuple[int, ...]) -> FusedPlan:
    """The same function with hidden layer i's output times `gains[i]` (a power of two, so the
    plaintext result is bit-for-bit the same) and the next layer's weights divided to match."""
    layers, carry = [], 1.0
    for i, layer in enumerate(plan.layers):
        g = float(gains[i]) if i < len(gains) and i < len(plan.layers) - 1 else 1.0
        if g <= 0 or math.log2(g) != int(math.log2(g)):
            raise PlanError(f"hidden gain {g} is not a power of two")
        a = layer.affine
        layers.append(FusedLayer(Affine(a.weight * (g / carry), a.bias * g, a.conv), layer.square))
        carry = g * g if layer.square else g
    return FusedPlan(layers, plan.output, list(plan.classes))


def _fitted_rings(fused: FusedPlan, precision: float, n: int | None, latency: str) -> list[int]:
    """Rings below the one the noise model picks (or the pinned one, if the model refuses it)."""
    try:
        chosen: int | None = _choose_params(fused, precision, n, latency, 0)[0].poly_modulus_degree
    except (PlanError, InsecureParametersError):
        chosen = None
    if n is not None:
        return [n] if chosen is None else []
    return [r for r in sorted(HE_STD_128) if chosen is None or r < chosen]


def compile_plan(
    plan: Plan,
    x_calib: np.ndarray,
    precision: float = 1e-4,
    poly_modulus_degree: int | None = None,
    name: str = "model",
    margin: float = 2.0,
    latency: str = "auto",
    verify_samples: int = 0,
    max_approx_change: float = 0.02,
) -> CompiledModel:
    """Approximate activations, fuse, normalise inputs, bound every intermediate on `x_calib`,
    pick parameters and the latency program.

    The result is guaranteed to fit (`bounds.verify` on the exact chain, or PlanError naming the
    layer and value). With `verify_samples` > 0 the compiler also runs that many calibration
    samples on real ciphertexts in latency packing, and a full throughput group (which costs the
    same as one sample), and raises the scale (up to 4 bits) until the measured error is within
    `precision` with room to spare; it refuses the model if it cannot get there. The
    measured errors go into the manifest (`meta.measured_error`). ReLU/sigmoid/tanh become fitted
    degree-2 polynomials (`approx`), refused if more than `max_approx_change` of the calibration
    predictions change (`meta.approximation` reports it).
    """
    x_calib = np.asarray(x_calib, dtype=np.float64).reshape(len(x_calib), -1)
    if x_calib.ndim != 2 or x_calib.shape[1] != plan.in_dim:
        raise PlanError(f"calibration data must have shape (n, {plan.in_dim})")
    plan = approximate(plan, x_calib, max_approx_change)
    fused = fuse(plan)
    scale = input_normalisation(x_calib)
    first = fused.layers[0].affine
    fused.layers[0] = FusedLayer(Affine(first.weight * scale[None, :], first.bias, first.conv), fused.layers[0].square)
    layer_bounds = analyse(fused, x_calib / scale, margin=margin)
    meta: dict[str, Any] = {
        "source": plan.source,
        "precision_target": precision,
        "calibration_samples": len(x_calib),
        "calibration_margin": margin,
        "unfused_ops": len(plan.ops),
        "fused_layers": len(fused.layers),
        "max_range_log2": math.log2(max(fused.ranges)),
        "bounds": [b.to_dict() for b in layer_bounds],
    }
    meta.update(plan.notes)

    def build(
        params: CKKSParams, kind: str, rescale_first: bool, plan: FusedPlan = fused, bounds: list = layer_bounds
    ) -> CompiledModel:
        compiled = CompiledModel(plan, params, scale, name, dict(meta), kind, rescale_first)
        compiled.meta["scale_bits_log2"] = params.scale_bits
        compiled.meta["latency_program"] = kind
        compiled.meta["rescale_first"] = rescale_first
        compiled.meta["headroom_bits"] = verify(compiled, bounds)
        return compiled

    def measured(compiled: CompiledModel) -> float:
        result = measure_error(compiled, x_calib, verify_samples)
        compiled.meta["measured_ms"] = result.pop("timings_ms")
        compiled.meta["measured_error"] = result
        return max(result.values())

    # A smaller ring first, when the compiler can measure: the largest scale it holds (the noise
    # model is pessimistic for deep plans) and hidden-layer gains, rows rotating before its
    # rescales (a small special prime). Kept only if the measured error is well within target.
    rows_ok = latency in ("auto", ROWS) and not (len(fused.layers) == 1 and not fused.layers[0].square)
    for ring in _fitted_rings(fused, precision, poly_modulus_degree, latency) if verify_samples and rows_ok else []:
        for gains in HIDDEN_GAINS:
            plan_g = with_hidden_gains(fused, gains)
            try:
                bounds_g = analyse(plan_g, x_calib / scale, margin=margin)
                params = select_params(
                    plan_g, precision, ring, "throughput-unrescaled", product_scale_switching=True, fit_scale=True
                )
                _latency_kind(plan_g, params, ROWS)
                compiled = build(params, ROWS, False, plan_g, bounds_g)
            except (PlanError, InsecureParametersError):
                break  # the ring does not hold the plan at any gain worth trying
            compiled.meta.update(
                hidden_gains=list(gains),
                fitted_scale=True,
                bounds=[b.to_dict() for b in bounds_g],
                max_range_log2=math.log2(max(plan_g.ranges)),
            )
            errors = measure_error(compiled, x_calib, verify_samples, timings=False)
            worst = max(errors.values())
            if worst <= ACCEPT_FRACTION * precision:
                # CKKS noise is random: a second, timed measurement must agree, and the manifest
                # states the worse of the two
                measured(compiled)
                second = compiled.meta["measured_error"]
                compiled.meta["measured_error"] = {k: max(v, errors[k]) for k, v in second.items()}
                if max(second.values()) <= ACCEPT_FRACTION * precision:
                    return compiled
            if worst > FIT_GIVE_UP * precision:
                break

    best: tuple[float, CompiledModel] | None = None
    for extra in range(5 if verify_samples else 1):
        try:
            compiled = build(*_choose_params(fused, precision, poly_modulus_degree, latency, extra))
        except (PlanError, InsecureParametersError):  # more bits no longer fit
            if best is None:
                raise
            break
        if not verify_samples:
            return compiled
        worst = measured(compiled)
        if worst <= ACCEPT_FRACTION * precision:  # headroom: the samples may understate the tail
            return compiled
        if best is None or worst < best[0]:
            best = (worst, compiled)
    assert best is not None
    if best[0] <= precision:
        return best[1]
    raise PlanError(
        f"measured error {best[0]:.3g} exceeds the precision target {precision:g} even at the best scale "
        f"(2^{best[1].params.scale_bits}, N={best[1].params.poly_modulus_degree}); relax --precision, "
        "pin a larger --poly-degree or try another --latency-program"
    )


def compile_model(
    model: Any,
    x_calib: np.ndarray,
    precision: float = 1e-4,
    poly_modulus_degree: int | None = None,
    name: str = "model",
    latency: str = "auto",
    verify_samples: int = 0,
    max_approx_change: float = 0.02,
) -> CompiledModel:
    """`veil he compile` in Python: a fitted scikit-learn model, ONNX path or ModelProto.

    Objects with a `to_onnx()` method (`veil.he.train.PolyCNN`) go through their ONNX export.
    """
    if hasattr(model, "to_onnx") and type(model).__name__ != "ModelProto":
        plan = from_onnx(model.to_onnx(), classes=list(np.asarray(getattr(model, "classes_", [])).tolist()))
    elif isinstance(model, str | Path) or type(model).__name__ == "ModelProto":
        plan = from_onnx(model)
    else:
        plan = from_sklearn(model)
    return compile_plan(
        plan,
        x_calib,
        precision,
        poly_modulus_degree,
        name,
        latency=latency,
        verify_samples=verify_samples,
        max_approx_change=max_approx_change,
    )
