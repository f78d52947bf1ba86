"""Operator fusion: the cheapest equivalent chain of affine maps and squares.

In CKKS every plaintext multiplication costs a level (a prime of the modulus) and every level
makes all later operations and the keys larger. So:

- consecutive affine maps (a scaler, then a linear model; two linear layers) compose into one;
- a degree-2 activation c2*y^2 + c1*y + c0 is rewritten c2*(y + c1/(2 c2))^2 + const: the shift
  goes into the previous layer's bias, c2 and the constant into the next layer's weights, so
  the ciphertext only ever sees a bare square (one level, no plaintext multiply);
- a degree-0/1 activation is an affine map and disappears into its neighbours;
- a convolution stays marked as one (`ConvGeometry`) through batch norm, per-element scalings
  and a following average pool, so the latency program can use its kernel structure.

The result evaluates to the same numbers as the source model, up to float rounding (tested).
"""

from __future__ import annotations

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import Act, Affine, ConvGeometry, FusedLayer, FusedPlan, Plan, Poly


def _is_diagonal(a: Affine) -> bool:
    w = a.weight
    return w.shape[0] == w.shape[1] and np.count_nonzero(w - np.diag(np.diag(w))) == 0


def compose_geometry(outer: Affine, inner: Affine) -> ConvGeometry | None:
    """The conv structure of outer(inner(x)), if it still has one.

    A per-element scaling on either side (batch norm, a folded activation coefficient) keeps
    the kernel offsets; a conv (or average pool) without padding after a conv is a conv with
    kernel k1 + (k2 - 1) s1 and stride s1 s2. Anything else is a dense map.
    """
    if inner.conv is not None and _is_diagonal(outer):
        return inner.conv
    if outer.conv is not None and _is_diagonal(inner):
        return outer.conv
    a, b = inner.conv, outer.conv
    if a is None or b is None or b.pad != (0, 0) or b.in_shape != a.out_shape:
        return None
    kernel = tuple(k1 + (k2 - 1) * s1 for k1, k2, s1 in zip(a.kernel, b.kernel, a.stride, strict=True))
    stride = tuple(s1 * s2 for s1, s2 in zip(a.stride, b.stride, strict=True))
    return ConvGeometry(a.in_shape, b.out_shape, kernel, stride, a.pad)  # type: ignore[arg-type]


def compose(outer: Affine, inner: Affine) -> Affine:
    """outer(inner(x)) as one affine map (keeping a convolution's structure where it survives)."""
    if outer.in_dim != inner.out_dim:
        raise PlanError(f"layer widths do not chain: {inner.out_dim} -> {outer.in_dim}")
    return Affine(outer.weight @ inner.weight, outer.weight @ inner.bias + outer.bias, compose_geometry(outer, inner))


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
        if isinstance(op, Act):
            raise PlanError(f"{op.kind} activation: approximate it first (veil.he.approx, done by the compiler)")
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
        layers.append(FusedLayer(Affine(current.weight, current.bias + shift, current.conv), square=True))
        pending = Affine(c2 * np.eye(width), np.full(width, c0 - c1 * c1 / (4.0 * c2)))
    assert pending is not None
    layers.append(FusedLayer(pending, square=False))
    return FusedPlan(layers=layers, output=plan.output, classes=list(plan.classes))
