"""Polynomial stand-ins for ReLU, sigmoid and tanh, fitted where the model's values actually are.

CKKS evaluates only additions and multiplications, and every multiplication costs a level, so
a non-polynomial activation must become a low-degree polynomial. A degree-1 fit costs nothing
(it folds into the neighbouring layers) and is taken when it is good enough; a degree-2 fit costs exactly
what a square activation costs (one level; fusion folds its linear and constant terms into the
neighbouring layers), and it is fitted by least squares over the pre-activation values the
owner's calibration data produces, plus a uniform grid over the same range so the fit does not
go wild between data points. What the approximation changed (the fit error per activation,
how many calibration predictions flipped, the largest score change) is reported at compile
time and goes into the manifest; past the owner's threshold the model is refused instead.

Dev-side only: the server never imports this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import Act, Plan, Poly, postprocess

DEGREE = 2
MAX_FIT_POINTS = 200_000


def fit(kind: str, values: np.ndarray, degree: int = DEGREE) -> tuple[tuple[float, ...], dict[str, float]]:
    """Least-squares polynomial for activation `kind` over `values` (and a grid over their range)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size > MAX_FIT_POINTS:
        v = np.random.default_rng(0).choice(v, MAX_FIT_POINTS, replace=False)
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi - lo < 1e-12:
        lo, hi = lo - 1.0, hi + 1.0
    pts = np.concatenate([v, np.linspace(lo, hi, max(256, v.size // 4))])
    act = Act(kind)
    coeffs = np.polynomial.polynomial.polyfit(pts, act.apply(pts), degree)
    approx = np.polynomial.polynomial.polyval(v, coeffs)
    err = np.abs(approx - act.apply(v))
    stats = {"lo": lo, "hi": hi, "max_abs_error": float(np.max(err)), "mean_abs_error": float(np.mean(err))}
    return tuple(float(c) for c in coeffs), stats


def approximate(plan: Plan, x_calib: np.ndarray, max_change: float = 0.02) -> Plan:
    """Replace every `Act` in `plan` by a fitted polynomial; refuse if predictions change too much.

    Fits run in order, each on the values the already-approximated earlier layers produce, so
    the report is about the model that will actually run. A degree-1 fit is tried first (it
    costs no level); it is kept if it changes at most half the allowed share of predictions.
    `max_change` is the largest fraction of calibration predictions allowed to differ from the
    exact model's (regression: the largest score change relative to the score range).
    """
    if not any(isinstance(op, Act) for op in plan.ops):
        return plan
    x = np.asarray(x_calib, dtype=np.float64)
    exact = plan.evaluate(x)
    tried = []
    for degree in (1, DEGREE):  # a linear stand-in costs no level at all: take it when it is good enough
        approx, report = _fit_all(plan, x, exact, degree, max_change)
        tried.append(report["prediction_change"])
        if report["prediction_change"] <= (max_change / 2 if degree < DEGREE else max_change):
            approx.notes["approximation"] = report
            return approx
    kinds = sorted({f["kind"] for f in report["activations"]})
    raise PlanError(
        f"degree-{DEGREE} approximations of {', '.join(kinds)} change {tried[-1]:.1%} of the calibration "
        f"predictions (threshold {max_change:.1%}); train with a square activation "
        "(veil.he.train) or raise --max-approx-change"
    )


def _fit_all(plan: Plan, x: np.ndarray, exact: np.ndarray, degree: int, max_change: float) -> tuple[Plan, dict]:
    h = x
    ops: list[Any] = []
    fits = []
    for i, op in enumerate(plan.ops):
        if isinstance(op, Act):
            coeffs, stats = fit(op.kind, h, degree)
            fits.append({"op": i, "kind": op.kind, "coeffs": list(coeffs), **stats})
            op = Poly(coeffs)
        ops.append(op)
        h = op.apply(h)
    approx = Plan(ops, plan.in_dim, plan.output, list(plan.classes), plan.source, dict(plan.notes))
    scores = approx.evaluate(x)
    change = float(np.max(np.abs(scores - exact)))
    if plan.output == "regression":
        spread = float(np.max(exact) - np.min(exact)) or 1.0
        flipped = change / spread
    else:
        flipped = float(np.mean(postprocess(scores, plan.output, []) != postprocess(exact, plan.output, [])))
    report = {
        "degree": degree,
        "activations": fits,
        "prediction_change": flipped,
        "max_score_change": change,
        "threshold": max_change,
        "calibration_samples": len(x),
    }
    return approx, report
