"""Front ends: scikit-learn estimators and ONNX graphs to an unfused `Plan`.

Only what CKKS evaluates exactly is accepted (affine maps, polynomial activations of degree
<= 2); anything else is refused with the layer's name rather than approximated silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import Affine, Op, OutputKind, Plan, Poly
from veil.he.train import PolyMLP

_CLASSIFIERS = ("LogisticRegression", "LinearSVC", "SGDClassifier", "RidgeClassifier", "SVC")
_REGRESSORS = ("LinearRegression", "Ridge", "Lasso", "ElasticNet", "LinearSVR", "SGDRegressor")


def from_sklearn(model: Any) -> Plan:
    """Translate a fitted estimator or Pipeline; raises PlanError naming what is unsupported."""
    steps = [s for _, s in model.steps] if type(model).__name__ == "Pipeline" else [model]
    ops: list[Op] = []
    output: OutputKind = "regression"
    classes: list = []
    in_dim: int | None = None
    for i, step in enumerate(steps):
        name = type(step).__name__
        if step is None or step == "passthrough":
            continue
        if i < len(steps) - 1 and name not in ("StandardScaler", "MinMaxScaler"):
            raise PlanError(f"pipeline step {name} is not a supported transformer")
        if name == "StandardScaler":
            n = int(step.n_features_in_)
            scale = np.ones(n) if step.scale_ is None else np.asarray(step.scale_, dtype=float)
            mean = np.zeros(n) if step.mean_ is None else np.asarray(step.mean_, dtype=float)
            ops.append(Affine(np.diag(1.0 / scale), -mean / scale))
        elif name == "MinMaxScaler":
            ops.append(Affine(np.diag(step.scale_), np.asarray(step.min_, dtype=float)))
        elif name in _CLASSIFIERS:
            if name == "SVC" and step.kernel != "linear":
                raise PlanError(f"SVC with kernel={step.kernel!r}: only linear SVMs are supported")
            coef = np.atleast_2d(np.asarray(step.coef_, dtype=float))
            if name == "SVC" and len(step.classes_) > 2:
                raise PlanError("multiclass SVC is one-vs-one; use LinearSVC (one-vs-rest)")
            ops.append(Affine(coef, np.atleast_1d(np.asarray(step.intercept_, dtype=float))))
            classes = list(step.classes_.tolist())
            output = "binary" if coef.shape[0] == 1 else "multiclass"
        elif name in _REGRESSORS:
            coef = np.atleast_2d(np.asarray(step.coef_, dtype=float))
            intercept = np.broadcast_to(np.asarray(step.intercept_, dtype=float), (coef.shape[0],))
            ops.append(Affine(coef, intercept.copy()))
            output = "regression"
        elif name in ("MLPClassifier", "MLPRegressor", "PolyMLP"):
            act = _mlp_activation(step)
            for j, (w, b) in enumerate(zip(step.coefs_, step.intercepts_, strict=True)):
                ops.append(Affine(np.asarray(w, dtype=float).T, np.asarray(b, dtype=float)))
                if j < len(step.coefs_) - 1 and act is not None:
                    ops.append(act)
            if name == "MLPRegressor":
                output = "regression"
            else:
                classes = list(np.asarray(step.classes_).tolist())
                output = "binary" if np.asarray(step.coefs_[-1]).shape[1] == 1 else "multiclass"
                if name == "MLPClassifier" and output == "binary":
                    output = "binary"
        else:
            raise PlanError(f"{name} is not supported in HE mode")
        if in_dim is None and ops:
            in_dim = ops[0].in_dim if isinstance(ops[0], Affine) else None
    if not ops or in_dim is None:
        raise PlanError("the model has no affine layer")
    return Plan(ops=ops, in_dim=in_dim, output=output, classes=classes, source="sklearn")


def _mlp_activation(step: Any) -> Poly | None:
    if isinstance(step, PolyMLP):
        return Poly(tuple(step.act_coeffs))
    if step.activation == "identity":
        return None
    raise PlanError(
        f"MLP activation {step.activation!r} is not a polynomial; train with "
        "veil.he.train.train_poly_mlp (square activation) instead"
    )


# ---------------------------------------------------------------------------------------- ONNX


class _Sym:
    """A tensor as c0 + c1*y + c2*y**2 of the current stage output y (element-wise)."""

    def __init__(self, stage: int, c0: Any = 0.0, c1: Any = 1.0, c2: Any = 0.0) -> None:
        self.stage, self.c = stage, [np.asarray(c0, float), np.asarray(c1, float), np.asarray(c2, float)]

    def degree(self) -> int:
        return max((k for k in range(3) if np.any(self.c[k] != 0)), default=0)


def from_onnx(path_or_model: str | Path | Any, output: OutputKind = "multiclass", classes: list | None = None) -> Plan:
    """Translate an ONNX graph of Gemm/MatMul/Add/Sub/Mul/Pow(2)/Identity nodes on one input.

    Element-wise polynomials may be spelled with several nodes (x*x*a + x*b + c); they must act
    on the output of the previous linear layer with the same coefficient on every element.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, str | Path) else path_or_model
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t).astype(float) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(float)
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise PlanError("the ONNX graph must have exactly one non-constant input")
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or not dims[-1].dim_value:
        raise PlanError("the ONNX input needs a fixed feature dimension")
    in_dim = int(dims[-1].dim_value)
    ops: list[Op] = []
    width = in_dim
    syms: dict[str, _Sym] = {inputs[0].name: _Sym(0)}

    def sym(name: str) -> _Sym | None:
        return syms.get(name)

    def flush(s: _Sym) -> None:
        """Materialise s as ops on the current stage so a linear layer can consume it."""
        nonlocal width
        if s.stage != len(ops):
            raise PlanError("the ONNX graph is not a chain (a tensor is used after a later layer)")
        c0, c1, c2 = (np.broadcast_to(c, (width,)) for c in s.c)
        if s.degree() == 2:
            if not (np.all(c2 == c2[0]) and np.all(c1 == c1[0]) and np.all(c0 == c0[0])):
                raise PlanError("polynomial activations must use the same coefficients on every element")
            ops.append(Poly((float(c0[0]), float(c1[0]), float(c2[0]))))
        elif np.any(c1 != 1) or np.any(c0 != 0):
            ops.append(Affine(np.diag(c1), c0.copy()))

    for node in graph.node:
        op, ins, out = node.op_type, list(node.input), node.output[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Constant":
            continue
        if op in ("Gemm", "MatMul"):
            x = sym(ins[0])
            if x is None or ins[1] not in inits:
                raise PlanError(f"{op} {node.name!r}: needs the data as A and a constant B")
            w = inits[ins[1]]
            if op == "Gemm":
                if attrs.get("transA", 0):
                    raise PlanError(f"Gemm {node.name!r}: transA is not supported")
                w = w.T if attrs.get("transB", 0) else w
                w = w * float(attrs.get("alpha", 1.0))
                b = inits[ins[2]] * float(attrs.get("beta", 1.0)) if len(ins) > 2 and ins[2] else 0.0
            else:
                b = 0.0
            flush(x)
            if w.shape[0] != width:
                raise PlanError(f"{op} {node.name!r}: expects {w.shape[0]} inputs, gets {width}")
            ops.append(Affine(w.T, np.broadcast_to(np.asarray(b, float).reshape(-1), (w.shape[1],)).copy()))
            width = w.shape[1]
            syms[out] = _Sym(len(ops))
        elif op in ("Add", "Sub", "Mul"):
            a, b = sym(ins[0]), sym(ins[1])
            ca, cb = inits.get(ins[0]), inits.get(ins[1])
            if a is None and b is None:
                raise PlanError(f"{op} {node.name!r}: unknown inputs")
            if op == "Mul" and a is not None and b is not None:
                if a.stage != b.stage or a.degree() + b.degree() > 2:
                    raise PlanError(f"Mul {node.name!r}: product of degree > 2")
                c = [
                    a.c[0] * b.c[0],
                    a.c[0] * b.c[1] + a.c[1] * b.c[0],
                    a.c[0] * b.c[2] + a.c[1] * b.c[1] + a.c[2] * b.c[0],
                ]
                syms[out] = _Sym(a.stage, *c)
            elif op == "Mul":
                s, k = (a, cb) if a is not None else (b, ca)
                assert s is not None and k is not None
                k = k.reshape(-1) if k.size > 1 else k.reshape(())
                syms[out] = _Sym(s.stage, s.c[0] * k, s.c[1] * k, s.c[2] * k)
            elif a is not None and b is not None:
                if a.stage != b.stage:
                    raise PlanError(f"{op} {node.name!r}: operands from different layers")
                sign = -1.0 if op == "Sub" else 1.0
                syms[out] = _Sym(a.stage, *[x + sign * y for x, y in zip(a.c, b.c, strict=True)])
            else:
                s, k = (a, cb) if a is not None else (b, ca)
                assert s is not None and k is not None
                k = k.reshape(-1) if k.size > 1 else k.reshape(())
                if op == "Sub" and a is not None:
                    syms[out] = _Sym(s.stage, s.c[0] - k, s.c[1], s.c[2])
                elif op == "Sub":
                    syms[out] = _Sym(s.stage, k - s.c[0], -s.c[1], -s.c[2])
                else:
                    syms[out] = _Sym(s.stage, s.c[0] + k, s.c[1], s.c[2])
        elif op == "Pow":
            a = sym(ins[0])
            if a is None or ins[1] not in inits or float(inits[ins[1]].reshape(-1)[0]) != 2.0 or a.degree() > 1:
                raise PlanError(f"Pow {node.name!r}: only x**2 of a linear value is supported")
            c0, c1 = a.c[0], a.c[1]
            syms[out] = _Sym(a.stage, c0 * c0, 2 * c0 * c1, c1 * c1)
        elif op in ("Identity", "Flatten", "Reshape"):
            a = sym(ins[0])
            if a is None:
                raise PlanError(f"{op} {node.name!r}: unknown input")
            syms[out] = a
        else:
            raise PlanError(f"ONNX op {op} ({node.name!r}) is not supported in HE mode")
    final = sym(graph.output[0].name)
    if final is None:
        raise PlanError("the ONNX output is not computed from the input")
    flush(final)
    if not ops:
        raise PlanError("the ONNX graph has no layer")
    if output == "binary" and width != 1:
        output = "multiclass"
    return Plan(ops=ops, in_dim=in_dim, output=output, classes=list(classes or []), source="onnx")
