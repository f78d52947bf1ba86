"""The model as HE sees it: a chain of affine maps and low-degree polynomial activations.

`Plan` is what the front ends (`compiler`) produce, one op per source layer, unfused. `FusedPlan`
is what the evaluator runs: affine maps separated by bare squares, every scaler and activation
coefficient already folded into the weights (see `fusion`). Both evaluate in plaintext so tests
can check that fusion changed nothing but the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from veil.he.errors import PlanError

OutputKind = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's dense matrix came from: shapes, kernel, stride, padding.

    The affine map of a conv layer is stored dense (exact, and what throughput packing and the
    plaintext reference use); this records its structure so the latency program can lay the
    input out as padded image grids and apply the kernels with a few shared rotations instead
    of a dense mat-vec (`packing`). It survives fusion with per-element scalings (batch norm).
    """

    in_shape: tuple[int, int, int]  # (C_in, H, W)
    out_shape: tuple[int, int, int]  # (C_out, Ho, Wo)
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left (bottom/right padding only shows in out_shape)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ConvGeometry:
        return cls(*(tuple(int(v) for v in d[k]) for k in ("in_shape", "out_shape", "kernel", "stride", "pad")))


@dataclass(frozen=True)
class Affine:
    """y = W x + b with W of shape (out, in); `conv` when W is a convolution's matrix."""

    weight: np.ndarray
    bias: np.ndarray
    conv: ConvGeometry | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float64)
        b = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise PlanError(f"affine layer shapes do not match: W {w.shape}, b {b.shape}")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise PlanError("affine layer has non-finite weights")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


@dataclass(frozen=True)
class Poly:
    """Element-wise polynomial activation sum_k coeffs[k] * y**k (degree <= 2 in HE)."""

    coeffs: tuple[float, ...]

    def apply(self, y: np.ndarray) -> np.ndarray:
        out = np.zeros_like(y)
        for k, c in enumerate(self.coeffs):
            out = out + c * y**k
        return out

    @property
    def degree(self) -> int:
        nz = [k for k, c in enumerate(self.coeffs) if c != 0.0]
        return max(nz) if nz else 0


@dataclass(frozen=True)
class Act:
    """A non-polynomial activation (relu, logistic, tanh) as the source model has it.

    Never evaluated encrypted: the compiler replaces it with a low-degree polynomial fitted over
    the calibration range (`veil.he.approx`) and reports what that changed.
    """

    kind: str

    def apply(self, y: np.ndarray) -> np.ndarray:
        if self.kind == "relu":
            return np.maximum(y, 0.0)
        if self.kind == "logistic":
            return 1.0 / (1.0 + np.exp(-y))
        if self.kind == "tanh":
            return np.tanh(y)
        raise PlanError(f"unknown activation {self.kind!r}")


Op = Affine | Poly | Act


@dataclass
class Plan:
    """An unfused model: the ops in order, the input width and how to read the output."""

    ops: list[Op]
    in_dim: int
    output: OutputKind
    classes: list = field(default_factory=list)
    source: str = ""
    notes: dict = field(default_factory=dict)  # what the front end changed (approximations), for the manifest

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Plaintext reference: the raw scores (logits / regression values), shape (n, out)."""
        h = np.asarray(x, dtype=np.float64)
        for op in self.ops:
            h = op.apply(h)
        return h


@dataclass
class FusedLayer:
    """One HE layer: an affine map, then (if `square`) an element-wise square."""

    affine: Affine
    square: bool


@dataclass
class FusedPlan:
    """The evaluator's program: affine maps and squares only, ending with an affine map.

    `ranges[i]` is the calibrated max |value| any ciphertext of layer i holds (partial sums,
    bias, output, its square), with the safety margin; the parameter selector sizes the primes
    from it.
    """

    layers: list[FusedLayer]
    output: OutputKind
    classes: list = field(default_factory=list)
    ranges: list[float] = field(default_factory=list)
    input_range: float = 1.0

    @property
    def in_dim(self) -> int:
        return self.layers[0].affine.in_dim

    @property
    def out_dim(self) -> int:
        return self.layers[-1].affine.out_dim

    @property
    def n_squares(self) -> int:
        return sum(1 for layer in self.layers if layer.square)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """Plaintext reference of exactly what the evaluator computes."""
        h = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            h = layer.affine.apply(h)
            if layer.square:
                h = h * h
        return h

    def calibrate(self, x: np.ndarray, margin: float = 2.0) -> None:
        """Record the range of every intermediate value on `x`, times a safety `margin`."""
        h = np.asarray(x, dtype=np.float64)
        self.input_range = float(np.max(np.abs(h))) * margin
        ranges: list[float] = []
        for layer in self.layers:
            # every partial sum of the mat-vec is bounded by sum |W_ij h_j| + |b_i|, which can
            # exceed the output when large terms cancel (see veil.he.bounds, the compiler's version)
            partial = float(np.max(np.abs(h) @ np.abs(layer.affine.weight).T + np.abs(layer.affine.bias)))
            h = layer.affine.apply(h)
            pre = float(np.max(np.abs(h)))
            if layer.square:
                h = h * h
            sq = pre * pre if layer.square else 0.0
            ranges.append(max(partial, pre, sq) * margin)
        self.ranges = ranges


def postprocess(scores: np.ndarray, output: OutputKind, classes: list) -> np.ndarray:
    """Turn raw scores into predictions on the client (sigmoid/argmax never run encrypted)."""
    scores = np.asarray(scores)
    if output == "regression":
        return scores[:, 0] if scores.shape[1] == 1 else scores
    idx = (scores[:, 0] > 0).astype(int) if output == "binary" else np.argmax(scores, axis=1)
    return np.asarray(classes)[idx] if classes else idx
