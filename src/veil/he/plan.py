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
class Affine:
    """y = W x + b with W of shape (out, in)."""

    weight: np.ndarray
    bias: np.ndarray

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


Op = Affine | Poly


@dataclass
class Plan:
    """An unfused model: the ops in order, the input width and how to read the output."""

    ops: list[Op]
    in_dim: int
    output: OutputKind
    classes: list = field(default_factory=list)
    source: str = ""

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

    `ranges[i]` is the calibrated max |value| after layer i (after its square, if any); the
    parameter selector sizes the first prime from it.
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
            h = layer.affine.apply(h)
            pre = float(np.max(np.abs(h)))
            if layer.square:
                h = h * h
            ranges.append(max(pre, float(np.max(np.abs(h)))) * margin)
        self.ranges = ranges


def postprocess(scores: np.ndarray, output: OutputKind, classes: list) -> np.ndarray:
    """Turn raw scores into predictions on the client (sigmoid/argmax never run encrypted)."""
    scores = np.asarray(scores)
    if output == "regression":
        return scores[:, 0] if scores.shape[1] == 1 else scores
    idx = (scores[:, 0] > 0).astype(int) if output == "binary" else np.argmax(scores, axis=1)
    return np.asarray(classes)[idx] if classes else idx
