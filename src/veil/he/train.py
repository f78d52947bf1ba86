"""Train an HE-friendly MLP (polynomial activations) on scikit-learn data, in numpy only.

ReLU and tanh cannot be evaluated in CKKS without deep polynomial approximations; a network
trained with the activation it will run with (here x**2 or a degree-2 polynomial) needs one level
per activation and loses nothing in translation. torch is deliberately not required.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PolyMLP:
    """A fitted MLP whose hidden activation is sum_k act_coeffs[k] * y**k.

    Attribute names follow scikit-learn's MLPClassifier (coefs_ are (in, out) matrices).
    """

    coefs_: list[np.ndarray]
    intercepts_: list[np.ndarray]
    act_coeffs: tuple[float, ...] = (0.0, 0.0, 1.0)
    classes_: np.ndarray = field(default_factory=lambda: np.arange(0))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            h = h @ w + b
            if i < len(self.coefs_) - 1:
                h = sum(c * h**k for k, c in enumerate(self.act_coeffs))
        return h

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(x), axis=1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == y))


def train_poly_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: tuple[int, ...] = (32,),
    act_coeffs: tuple[float, ...] = (0.0, 0.0, 1.0),
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> PolyMLP:
    """Fit a softmax classifier with polynomial hidden activations by mini-batch Adam.

    Small initial weights keep the squares from exploding early in training; the result is
    deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    classes, yi = np.unique(y, return_inverse=True)
    sizes = [x.shape[1], *hidden, len(classes)]
    ws = [rng.normal(0, 1.0 / np.sqrt(a), (a, b)) * 0.5 for a, b in zip(sizes, sizes[1:], strict=False)]
    bs = [np.zeros(b) for b in sizes[1:]]
    params = ws + bs
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(len(classes))[yi]
    coeffs = np.asarray(act_coeffs + (0.0,) * (3 - len(act_coeffs)))
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            hs, pre = [x[idx]], []
            for i in range(len(ws)):
                z = hs[-1] @ ws[i] + bs[i]
                pre.append(z)
                hs.append(coeffs[0] + coeffs[1] * z + coeffs[2] * z * z if i < len(ws) - 1 else z)
            logits = hs[-1] - hs[-1].max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            grad = (p - onehot[idx]) / len(idx)
            gws, gbs = [None] * len(ws), [None] * len(ws)
            for i in reversed(range(len(ws))):
                if i < len(ws) - 1:
                    grad = grad * (coeffs[1] + 2 * coeffs[2] * pre[i])
                gws[i] = hs[i].T @ grad + weight_decay * ws[i]
                gbs[i] = grad.sum(axis=0)
                grad = grad @ ws[i].T
            step += 1
            for j, g in enumerate(gws + gbs):
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                mh = m[j] / (1 - 0.9**step)
                vh = v[j] / (1 - 0.999**step)
                params[j] -= lr * mh / (np.sqrt(vh) + 1e-8)
    n = len(ws)
    return PolyMLP(
        coefs_=[p.copy() for p in params[:n]],
        intercepts_=[p.copy() for p in params[n:]],
        act_coeffs=tuple(float(c) for c in act_coeffs),
        classes_=classes,
    )
