"""Front ends: scikit-learn estimators and ONNX graphs to an unfused `Plan`.

What CKKS evaluates exactly is translated as is: affine maps (every linear transformer and
linear model, convolutions, pooling, batch norm) and polynomial activations of degree <= 2.
ReLU, sigmoid and tanh become `Act` ops that the compiler replaces with fitted polynomials and
reports (never silently); anything else is refused with the layer's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import Act, Affine, ConvGeometry, Op, OutputKind, Plan, Poly
from veil.he.train import PolyMLP

_CLASSIFIERS = (
    "LogisticRegression",
    "LinearSVC",
    "SGDClassifier",
    "RidgeClassifier",
    "SVC",
    "Perceptron",
    "PassiveAggressiveClassifier",
    "LinearDiscriminantAnalysis",
)
_REGRESSORS = (
    "LinearRegression",
    "Ridge",
    "Lasso",
    "ElasticNet",
    "LinearSVR",
    "SGDRegressor",
    "BayesianRidge",
    "ARDRegression",
    "HuberRegressor",
    "TheilSenRegressor",
    "Lars",
    "LassoLars",
    "OrthogonalMatchingPursuit",
)
_ACTIVATIONS = {"relu": "relu", "logistic": "logistic", "tanh": "tanh"}


def _arr(v: Any, n: int | None = None, default: float = 0.0) -> np.ndarray:
    if v is None:
        return np.full(n or 0, default)
    return np.asarray(v, dtype=float)


def _transformer(step: Any, name: str) -> Affine:
    """A linear scikit-learn transformer as the affine map its `transform` computes."""
    if name == "StandardScaler":
        n = int(step.n_features_in_)
        scale = _arr(step.scale_, n, 1.0)
        mean = _arr(step.mean_, n, 0.0)
        return Affine(np.diag(1.0 / scale), -mean / scale)
    if name == "MinMaxScaler":
        if getattr(step, "clip", False):
            raise PlanError("MinMaxScaler(clip=True) clips, which is not linear; refit with clip=False")
        return Affine(np.diag(step.scale_), np.asarray(step.min_, dtype=float))
    if name == "MaxAbsScaler":
        return Affine(np.diag(1.0 / np.asarray(step.scale_, dtype=float)), np.zeros(int(step.n_features_in_)))
    if name == "RobustScaler":
        n = int(step.n_features_in_)
        scale = _arr(step.scale_, n, 1.0)
        center = _arr(step.center_, n, 0.0)
        return Affine(np.diag(1.0 / scale), -center / scale)
    if name in ("PCA", "IncrementalPCA"):
        comp = np.asarray(step.components_, dtype=float)
        mean = np.asarray(step.mean_, dtype=float)
        if getattr(step, "whiten", False):
            comp = comp / np.sqrt(np.asarray(step.explained_variance_, dtype=float))[:, None]
        return Affine(comp, -comp @ mean)
    if name == "TruncatedSVD":
        comp = np.asarray(step.components_, dtype=float)
        return Affine(comp, np.zeros(comp.shape[0]))
    if name == "LinearDiscriminantAnalysis":
        k = int(step._max_components)
        scal = np.asarray(step.scalings_, dtype=float)[:, :k]
        if step.solver == "svd":
            return Affine(scal.T, -scal.T @ np.asarray(step.xbar_, dtype=float))
        if step.solver == "eigen":
            return Affine(scal.T, np.zeros(k))
        raise PlanError(f"LinearDiscriminantAnalysis(solver={step.solver!r}) has no transform")
    if hasattr(step, "get_support") and callable(step.get_support):  # feature selection: a 0/1 matrix
        keep = np.flatnonzero(step.get_support())
        sel = np.zeros((len(keep), int(step.n_features_in_)))
        sel[np.arange(len(keep)), keep] = 1.0
        return Affine(sel, np.zeros(len(keep)))
    raise PlanError(
        f"pipeline step {name} is not a supported transformer (linear ones are: scalers, PCA, "
        "TruncatedSVD, LinearDiscriminantAnalysis, feature selectors)"
    )


def from_sklearn(model: Any) -> Plan:
    """Translate a fitted estimator or Pipeline; raises PlanError naming what is unsupported.

    Every linear transformer becomes an affine map that fusion folds into its neighbours;
    MLPs with relu/logistic/tanh get an `Act` op that the compiler approximates by a fitted
    polynomial (reported, and refused past the owner's threshold).
    """
    steps = [s for _, s in model.steps] if type(model).__name__ == "Pipeline" else [model]
    ops: list[Op] = []
    output: OutputKind = "regression"
    classes: list = []
    for i, step in enumerate(steps):
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        name = type(step).__name__
        if i < len(steps) - 1:
            ops.append(_transformer(step, name))
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
        else:
            raise PlanError(f"{name} is not supported in HE mode")
    affines = [op for op in ops if isinstance(op, Affine)]
    if not affines:
        raise PlanError("the model has no affine layer")
    return Plan(ops=ops, in_dim=affines[0].in_dim, output=output, classes=classes, source="sklearn")


def _mlp_activation(step: Any) -> Poly | Act | None:
    if isinstance(step, PolyMLP):
        return Poly(tuple(step.act_coeffs))
    if step.activation == "identity":
        return None
    if step.activation in _ACTIVATIONS:
        return Act(_ACTIVATIONS[step.activation])
    raise PlanError(f"MLP activation {step.activation!r} is not supported")


# ---------------------------------------------------------------------------------------- ONNX


class _Sym:
    """A tensor as c0 + c1*y + c2*y**2 of the current stage output y (element-wise).

    `shape` is the tensor's shape without the batch dimension; the coefficients are flat
    arrays over it (or scalars), so per-channel constants broadcast the way ONNX does.
    """

    def __init__(self, stage: int, shape: tuple[int, ...], c0: Any = 0.0, c1: Any = 1.0, c2: Any = 0.0) -> None:
        self.stage, self.shape = stage, tuple(int(d) for d in shape)
        self.c = [np.asarray(c0, float), np.asarray(c1, float), np.asarray(c2, float)]

    @property
    def width(self) -> int:
        return int(np.prod(self.shape))

    def degree(self) -> int:
        return max((k for k in range(3) if np.any(self.c[k] != 0)), default=0)

    def with_coeffs(self, c0: Any, c1: Any, c2: Any) -> _Sym:
        return _Sym(self.stage, self.shape, c0, c1, c2)


def _bcast(k: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A constant broadcast (ONNX/numpy rules, batch dimension first) over `shape`, flattened."""
    k = np.asarray(k, dtype=float)
    while k.ndim > len(shape):
        if k.shape[0] != 1:
            raise PlanError(f"{what}: a constant of shape {k.shape} does not broadcast over the batch")
        k = k[0]
    try:
        return np.broadcast_to(k, shape).reshape(-1)
    except ValueError:
        raise PlanError(f"{what}: a constant of shape {k.shape} does not broadcast to {shape}") from None


def _ints(attrs: dict, key: str, default: list[int]) -> list[int]:
    return [int(v) for v in attrs.get(key, default)]


def _spatial(node: Any, attrs: dict, shape: tuple[int, ...], kernel: tuple[int, int]) -> tuple:
    """(stride, pads (top, left, bottom, right), out H, out W) of a 2-D Conv/AveragePool."""
    if len(shape) != 3:
        raise PlanError(
            f"{node.op_type} {node.name!r}: needs an image input (C, H, W) but the graph gives shape {shape}; "
            "export the model with an image-shaped input or a Reshape to (N, C, H, W) before it"
        )
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise PlanError(f"{node.op_type} {node.name!r}: auto_pad is not supported; export explicit pads")
    if any(d != 1 for d in _ints(attrs, "dilations", [1, 1])):
        raise PlanError(f"{node.op_type} {node.name!r}: dilated kernels are not supported")
    stride = tuple(_ints(attrs, "strides", [1, 1]))
    pads = tuple(_ints(attrs, "pads", [0, 0, 0, 0]))
    _, h, w = shape
    ho = (h + pads[0] + pads[2] - kernel[0]) // stride[0] + 1
    wo = (w + pads[1] + pads[3] - kernel[1]) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise PlanError(f"{node.op_type} {node.name!r}: kernel {kernel} does not fit the {h}x{w} input")
    return stride, pads, ho, wo


def _conv_matrix(kernels: np.ndarray, shape: tuple, stride: tuple, pads: tuple, ho: int, wo: int) -> np.ndarray:
    """The dense (C_out*Ho*Wo, C_in*H*W) matrix of a 2-D convolution (zero padding), CHW order."""
    c_out, c_in, kh, kw = kernels.shape
    _, h, w = shape
    mat = np.zeros((c_out, ho, wo, c_in, h, w))
    ys, xs = np.arange(ho), np.arange(wo)
    for dy in range(kh):
        rows = ys * stride[0] + dy - pads[0]
        vy = (rows >= 0) & (rows < h)
        for dx in range(kw):
            cols = xs * stride[1] + dx - pads[1]
            vx = (cols >= 0) & (cols < w)
            yy, xx = np.ix_(ys[vy], xs[vx])
            for co in range(c_out):
                for ci in range(c_in):
                    mat[co, yy, xx, ci, rows[vy][:, None], cols[vx][None, :]] += kernels[co, ci, dy, dx]
    return mat.reshape(c_out * ho * wo, c_in * h * w)


_FOLDABLE = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": lambda a, b: np.floor_divide(a, b) if a.dtype.kind in "iu" and b.dtype.kind in "iu" else a / b,
    "Mod": np.mod,
}


def _fold(op: str, ins: list[np.ndarray], attrs: dict) -> np.ndarray | None:
    """Evaluate a node whose inputs are all constants (shape arithmetic torch exports emit)."""
    if op in _FOLDABLE and len(ins) == 2:
        return np.asarray(_FOLDABLE[op](ins[0], ins[1]))
    if op == "Gather":
        return np.take(ins[0], ins[1].astype(np.int64), axis=int(attrs.get("axis", 0)))
    if op == "Unsqueeze":
        axes = ins[1].astype(int).tolist() if len(ins) > 1 else _ints(attrs, "axes", [])
        out = ins[0]
        for a in sorted(axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = ins[1].astype(int).tolist() if len(ins) > 1 else _ints(attrs, "axes", [])
        return np.squeeze(ins[0], axis=tuple(axes)) if axes else np.squeeze(ins[0])
    if op == "Concat":
        return np.concatenate([np.atleast_1d(i) for i in ins], axis=int(attrs.get("axis", 0)))
    if op in ("Cast", "Identity", "Floor"):
        return np.floor(ins[0]) if op == "Floor" else ins[0]
    if op == "Slice":
        starts, ends = ins[1].astype(int), ins[2].astype(int)
        axes = ins[3].astype(int) if len(ins) > 3 else np.arange(len(starts))
        steps = ins[4].astype(int) if len(ins) > 4 else np.ones(len(starts), int)
        idx = [slice(None)] * ins[0].ndim
        for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
            idx[a] = slice(b, e, st)
        return ins[0][tuple(idx)]
    if op == "ConstantOfShape":
        value = attrs.get("value")
        fill = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
        return np.full(ins[0].astype(int), fill)
    return None


def from_onnx(path_or_model: str | Path | Any, output: OutputKind = "multiclass", classes: list | None = None) -> Plan:
    """Translate an ONNX chain of linear layers and polynomial (or approximable) activations.

    Linear: Gemm, MatMul, Conv (stride, padding, several channels), AveragePool,
    GlobalAveragePool, BatchNormalization, Add/Sub/Mul/Div by constants, Flatten, Reshape,
    Squeeze/Unsqueeze, Dropout, Identity. Activations: x*x, Pow(2), polynomials of degree <= 2
    spelled with several nodes (x*x*a + x*b + c) with the same coefficients on every element;
    Relu/Sigmoid/Tanh become `Act` ops the compiler approximates. Shape arithmetic that torch
    exports (Shape, Gather, Concat, Mod, ...) is folded to constants first.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, str | Path) else path_or_model
    graph = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise PlanError("the ONNX graph must have exactly one non-constant input")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) for d in dims[1:])
    if not dims or not shape or any(d <= 0 for d in shape):
        raise PlanError("the ONNX input needs fixed dimensions after the batch dimension")
    in_dim = int(np.prod(shape))
    ops: list[Op] = []
    syms: dict[str, _Sym] = {inputs[0].name: _Sym(0, shape)}

    def sym(name: str) -> _Sym | None:
        return syms.get(name)

    def const(name: str) -> np.ndarray | None:
        return consts.get(name) if name else None

    def flush(s: _Sym, what: str) -> None:
        """Materialise s as ops on the current stage so a linear layer can consume it."""
        if s.stage != len(ops):
            raise PlanError(f"{what}: the ONNX graph is not a chain (a tensor is used after a later layer)")
        c0, c1, c2 = (np.broadcast_to(c, (s.width,)).astype(float) for c in s.c)
        if s.degree() == 2:
            if np.all(c2 == c2[0]) and np.all(c1 == c1[0]) and np.all(c0 == c0[0]):
                ops.append(Poly((float(c0[0]), float(c1[0]), float(c2[0]))))
                return
            # per-element coefficients (a per-channel bias before the square, batch norm after
            # it): c2 (y + s)^2 + c0 - c2 s^2 with s = c1 / (2 c2), as sqrt|c2| (y + s), a bare
            # square, then sign(c2) and the constant; fusion folds both maps into the layers
            if np.any(c2 == 0):
                raise PlanError(f"{what}: an activation that is quadratic on some elements and linear on others")
            shift = c1 / (2 * c2)
            root = np.sqrt(np.abs(c2))
            ops.append(Affine(np.diag(root), root * shift))
            ops.append(Poly((0.0, 0.0, 1.0)))
            ops.append(Affine(np.diag(np.sign(c2)), c0 - c2 * shift * shift))
        elif np.any(c1 != 1) or np.any(c0 != 0):
            ops.append(Affine(np.diag(c1), c0.copy()))

    for node in graph.node:
        op, ins, out = node.op_type, list(node.input), node.output[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        what = f"{op} {node.name!r}"
        if op == "Constant":
            value = attrs.get("value")
            if value is None:
                raise PlanError(f"{what}: only tensor constants are supported")
            consts[out] = numpy_helper.to_array(value)
            continue
        if op == "Shape":
            a = sym(ins[0])
            if a is None:
                raise PlanError(f"{what}: unknown input")
            consts[out] = np.array([1, *a.shape], dtype=np.int64)  # batch folded as 1
            continue
        if all(i in consts for i in ins if i) and op not in ("Gemm", "MatMul", "Conv"):
            folded = _fold(op, [consts[i] for i in ins if i], attrs)
            if folded is None:
                raise PlanError(f"{what}: constant {op} is not supported")
            consts[out] = np.asarray(folded)
            continue
        if op in ("Gemm", "MatMul"):
            x, w = sym(ins[0]), const(ins[1])
            if x is None or w is None:
                raise PlanError(f"{what}: needs the data as A and a constant B")
            w = w.astype(float)
            if len(x.shape) != 1:
                raise PlanError(f"{what}: input of shape {x.shape}; Flatten it first")
            if op == "Gemm":
                if attrs.get("transA", 0):
                    raise PlanError(f"{what}: transA is not supported")
                w = (w.T if attrs.get("transB", 0) else w) * float(attrs.get("alpha", 1.0))
                bias = const(ins[2]) if len(ins) > 2 else None
                b = 0.0 if bias is None else bias.astype(float) * float(attrs.get("beta", 1.0))
            else:
                b = 0.0
            flush(x, what)
            if w.ndim != 2 or w.shape[0] != x.width:
                raise PlanError(f"{what}: expects {w.shape[0]} inputs, gets {x.width}")
            ops.append(Affine(w.T, np.broadcast_to(np.asarray(b, float).reshape(-1), (w.shape[1],)).copy()))
            syms[out] = _Sym(len(ops), (w.shape[1],))
        elif op == "Conv":
            x, k = sym(ins[0]), const(ins[1])
            if x is None or k is None:
                raise PlanError(f"{what}: needs the data and constant kernels")
            k = k.astype(float)
            if int(attrs.get("group", 1)) != 1:
                raise PlanError(f"{what}: grouped convolutions are not supported")
            if k.ndim != 4:
                raise PlanError(f"{what}: only 2-D convolutions are supported")
            stride, pads, ho, wo = _spatial(node, attrs, x.shape, (k.shape[2], k.shape[3]))
            if k.shape[1] != x.shape[0]:
                raise PlanError(f"{what}: kernels take {k.shape[1]} channels, input has {x.shape[0]}")
            flush(x, what)
            bias = const(ins[2]) if len(ins) > 2 else None
            b = np.zeros(k.shape[0]) if bias is None else bias.astype(float)
            mat = _conv_matrix(k, x.shape, stride, pads, ho, wo)
            geom = ConvGeometry(x.shape, (k.shape[0], ho, wo), (k.shape[2], k.shape[3]), stride, pads[:2])  # type: ignore[arg-type]
            ops.append(Affine(mat, np.repeat(b, ho * wo), geom))
            syms[out] = _Sym(len(ops), (k.shape[0], ho, wo))
        elif op in ("AveragePool", "GlobalAveragePool"):
            x = sym(ins[0])
            if x is None:
                raise PlanError(f"{what}: unknown input")
            if op == "GlobalAveragePool":
                if len(x.shape) != 3:
                    raise PlanError(f"{what}: needs an image input (C, H, W), gets {x.shape}")
                kernel = (x.shape[1], x.shape[2])
                attrs = {}
            else:
                kernel = tuple(_ints(attrs, "kernel_shape", []))
                if len(kernel) != 2 or attrs.get("ceil_mode", 0):
                    raise PlanError(f"{what}: only 2-D pooling without ceil_mode is supported")
            stride, pads, ho, wo = _spatial(node, attrs, x.shape, kernel)  # type: ignore[arg-type]
            c = x.shape[0]
            ones = np.zeros((c, c, *kernel))
            ones[np.arange(c), np.arange(c)] = 1.0
            mat = _conv_matrix(ones, x.shape, stride, pads, ho, wo)
            if attrs.get("count_include_pad", 0):
                mat = mat / (kernel[0] * kernel[1])
            else:
                mat = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1.0)
            flush(x, what)
            geom = ConvGeometry(x.shape, (c, ho, wo), kernel, stride, pads[:2])  # type: ignore[arg-type]
            ops.append(Affine(mat, np.zeros(c * ho * wo), geom))
            syms[out] = _Sym(len(ops), (c, ho, wo))
        elif op == "MaxPool":
            raise PlanError(f"{what}: max pooling is not polynomial; use AveragePool")
        elif op == "BatchNormalization":
            x = sym(ins[0])
            params = [const(i) for i in ins[1:5]]
            if x is None or any(p is None for p in params):
                raise PlanError(f"{what}: needs constant scale, bias, mean and variance (inference mode)")
            gamma, beta, mean, var = (p.astype(float) for p in params)  # type: ignore[union-attr]
            a = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
            per = (-1,) + (1,) * (len(x.shape) - 1)
            mul = _bcast(a.reshape(per), x.shape, what)
            add = _bcast((beta - mean * a).reshape(per), x.shape, what)
            syms[out] = x.with_coeffs(x.c[0] * mul + add, x.c[1] * mul, x.c[2] * mul)
        elif op in ("Add", "Sub", "Mul", "Div"):
            a, b = sym(ins[0]), sym(ins[1])
            ca, cb = const(ins[0]), const(ins[1])
            if a is None and b is None:
                raise PlanError(f"{what}: unknown inputs")
            if a is not None and b is not None:
                if a.stage != b.stage or a.shape != b.shape:
                    raise PlanError(f"{what}: operands from different layers or of different shapes")
                if op == "Div":
                    raise PlanError(f"{what}: division by an encrypted value")
                if op == "Mul":
                    if a.degree() + b.degree() > 2:
                        raise PlanError(f"{what}: product of degree > 2")
                    c = [
                        a.c[0] * b.c[0],
                        a.c[0] * b.c[1] + a.c[1] * b.c[0],
                        a.c[0] * b.c[2] + a.c[1] * b.c[1] + a.c[2] * b.c[0],
                    ]
                    syms[out] = a.with_coeffs(*c)
                else:
                    sign = -1.0 if op == "Sub" else 1.0
                    syms[out] = a.with_coeffs(*[x + sign * y for x, y in zip(a.c, b.c, strict=True)])
                continue
            s, k = (a, cb) if a is not None else (b, ca)
            assert s is not None
            if k is None:
                raise PlanError(f"{what}: unknown operand")
            kv = _bcast(k, s.shape, what)
            if op == "Div":
                if a is None:
                    raise PlanError(f"{what}: division by an encrypted value")
                kv = 1.0 / kv
            if op in ("Mul", "Div"):
                syms[out] = s.with_coeffs(s.c[0] * kv, s.c[1] * kv, s.c[2] * kv)
            elif op == "Sub" and a is not None:
                syms[out] = s.with_coeffs(s.c[0] - kv, s.c[1], s.c[2])
            elif op == "Sub":
                syms[out] = s.with_coeffs(kv - s.c[0], -s.c[1], -s.c[2])
            else:
                syms[out] = s.with_coeffs(s.c[0] + kv, s.c[1], s.c[2])
        elif op == "Neg":
            a = sym(ins[0])
            if a is None:
                raise PlanError(f"{what}: unknown input")
            syms[out] = a.with_coeffs(-a.c[0], -a.c[1], -a.c[2])
        elif op == "Pow":
            a, e = sym(ins[0]), const(ins[1])
            if a is None or e is None or float(e.reshape(-1)[0]) != 2.0 or a.degree() > 1:
                raise PlanError(f"{what}: only x**2 of a linear value is supported")
            c0, c1 = a.c[0], a.c[1]
            syms[out] = a.with_coeffs(c0 * c0, 2 * c0 * c1, c1 * c1)
        elif op in ("Relu", "Sigmoid", "Tanh"):
            a = sym(ins[0])
            if a is None:
                raise PlanError(f"{what}: unknown input")
            flush(a, what)
            ops.append(Act({"Relu": "relu", "Sigmoid": "logistic", "Tanh": "tanh"}[op]))
            syms[out] = _Sym(len(ops), a.shape)
        elif op in ("Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            a = sym(ins[0])
            if a is None:
                raise PlanError(f"{what}: unknown input")
            if op == "Flatten":
                if int(attrs.get("axis", 1)) != 1:
                    raise PlanError(f"{what}: only Flatten(axis=1) keeps the batch dimension")
                new: tuple[int, ...] = (a.width,)
            elif op == "Reshape":
                target = const(ins[1])
                if target is None:
                    raise PlanError(f"{what}: the target shape must be constant")
                new = _reshape(a.shape, [int(t) for t in target.reshape(-1)], what)
            elif op in ("Squeeze", "Unsqueeze"):
                axes = const(ins[1]).astype(int).tolist() if len(ins) > 1 and ins[1] else _ints(attrs, "axes", [])  # type: ignore[union-attr]
                if 0 in axes:
                    raise PlanError(f"{what}: cannot {op.lower()} the batch dimension")
                full = [1, *a.shape]
                if op == "Squeeze":
                    full = [d for i, d in enumerate(full) if i not in axes and not (not axes and d == 1 and i)]
                else:
                    for ax in sorted(axes):
                        full.insert(ax, 1)
                new = tuple(full[1:])
            else:
                new = a.shape
            syms[out] = _Sym(a.stage, new, *a.c)
        else:
            raise PlanError(f"ONNX op {op} ({node.name!r}) is not supported in HE mode")
    final = sym(graph.output[0].name)
    if final is None:
        raise PlanError("the ONNX output is not computed from the input")
    flush(final, "output")
    if not any(isinstance(o, Affine) for o in ops):
        raise PlanError("the ONNX graph has no layer")
    width = final.width
    if output == "binary" and width != 1:
        output = "multiclass"
    return Plan(ops=ops, in_dim=in_dim, output=output, classes=list(classes or []), source="onnx")


def _reshape(shape: tuple[int, ...], target: list[int], what: str) -> tuple[int, ...]:
    """ONNX Reshape semantics (0 copies a dimension, -1 is inferred); the first is the batch."""
    full = [1, *shape]
    dims = [full[i] if t == 0 and i < len(full) else t for i, t in enumerate(target)]
    rest = dims[1:]
    width = int(np.prod(shape))
    if rest.count(-1) > 1:
        raise PlanError(f"{what}: more than one inferred dimension")
    if -1 in rest:
        known = int(np.prod([d for d in rest if d != -1])) or 1
        rest[rest.index(-1)] = width // known
    if int(np.prod(rest)) != width:
        raise PlanError(f"{what}: cannot reshape {shape} to {tuple(rest)} per sample")
    return tuple(rest)
