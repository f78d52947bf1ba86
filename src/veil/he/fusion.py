"""Operator fusion: the cheapest equivalent chain of affine maps and squares.

In CKKS every plaintext multiplication costs a level (a prime of the modulus) and every level
makes all later operations and the keys larger. So:

- consecutive affine maps (a scaler, then a linear model; two linear layers) compose into one;
- a degree-2 activation c2*y^2 + c1*y + c0 is rewritten c2*(y + c1/(2 c2))^2 + const: the shift
  goes into the previous layer's bias, c2 and the constant into the next layer's weights, so
  the ciphertext only ever sees a bare square (one level, no plaintext multiply);
- a degree-0/1 activation is an affine map and disappears into its neighbours.

The result evaluates to the same numbers as the source model, up to float rounding (tested).
"""

from __future__ import annotations

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import Affine, FusedLayer, FusedPlan, Plan, Poly


def compose(outer: Affine, inner: Affine) -> Affine:
    """outer(inner(x)) as one affine map."""
    if outer.in_dim != inner.out_dim:
        raise PlanError(f"layer widths do not chain: {inner.out_dim} -> {outer.in_dim}")
    return Affine(outer.weight @ inner.weight, outer.weight @ inner.bias + outer.bias)


def _identity(n: int) -> Affine:
    return Affine(np.eye(n), np.zeros(n))


def fuse(plan: Plan) -> FusedPlan:
    """Fuse `plan` into affine/square layers; refuses activations of degree > 2."""
    if not plan.ops:
        raise PlanError("the model has no layers")
    layers: list[FusedLayer] = []
    pending: Affine | None = None
    width = plan.in_dim
    for op in plan.ops:
        if isinstance(op, Affine):
            if op.in_dim != width:
                raise PlanError(f"layer expects {op.in_dim} inputs, previous layer gives {width}")
            pending = op if pending is None else compose(op, pending)
            width = op.out_dim
            continue
        if not isinstance(op, Poly):
            raise PlanError(f"unsupported op {type(op).__name__}")
        current = pending if pending is not None else _identity(width)
        coeffs = list(op.coeffs) + [0.0] * (3 - len(op.coeffs))
        if op.degree > 2:
            raise PlanError(f"activation of degree {op.degree}: HE mode supports polynomials of degree <= 2")
        c0, c1, c2 = coeffs[0], coeffs[1], coeffs[2]
        if c2 == 0.0:
            pending = compose(Affine(c1 * np.eye(width), np.full(width, c0)), current)
            continue
        shift = c1 / (2.0 * c2)
        layers.append(FusedLayer(Affine(current.weight, current.bias + shift), square=True))
        pending = Affine(c2 * np.eye(width), np.full(width, c0 - c1 * c1 / (4.0 * c2)))
    assert pending is not None
    layers.append(FusedLayer(pending, square=False))
    return FusedPlan(layers=layers, output=plan.output, classes=list(plan.classes))
