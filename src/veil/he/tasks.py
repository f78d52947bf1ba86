"""The reference tasks (demo, tests, benchmark), on scikit-learn's bundled data sets.

(a) logistic regression with a standard scaler on breast_cancer (30 features);
(b) an MLP 64 -> 32 -> 10 with square activation on digits, trained in numpy;
(c) the deeper MLP 64 -> 32 -> 16 -> 10 (two squares);
(d) a CryptoNets-style CNN (Conv 3x3 stride 2, square, Dense) on the 8x8 digits, via ONNX.
Fixed seeds and splits, so every part of Veil measures the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Task:
    name: str
    model: Any
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def breast_cancer_lr() -> Task:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    return Task("breast_cancer_lr", model, xtr, xte, ytr, yte)


def digits_mlp() -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from veil.he.train import train_poly_mlp

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = train_poly_mlp(xtr, ytr, hidden=(32,), act_coeffs=(0.0, 0.0, 1.0), seed=0)
    return Task("digits_mlp", model, xtr, xte, ytr, yte)


def digits_mlp3() -> Task:
    """The deeper MLP 64 -> 32 -> 16 -> 10 with two square activations (depth 5)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from veil.he.train import train_poly_mlp

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = train_poly_mlp(xtr, ytr, hidden=(32, 16), act_coeffs=(0.0, 0.0, 1.0), seed=0)
    return Task("digits_mlp3", model, xtr, xte, ytr, yte)


def digits_cnn() -> Task:
    """CryptoNets-style CNN on the 8x8 digits: Conv(1->4, 3x3, stride 2, pad 1) -> x**2 -> Dense(64->10).

    The model is compiled from its ONNX export (`PolyCNN.to_onnx`), as a torch model would be.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from veil.he.train import train_poly_cnn

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    model = train_poly_cnn(xtr, ytr, in_shape=(1, 8, 8), channels=4, kernel=3, stride=2, padding=1, seed=0)
    return Task("digits_cnn", model, xtr, xte, ytr, yte)


TASKS = {
    "breast_cancer_lr": breast_cancer_lr,
    "digits_mlp": digits_mlp,
    "digits_mlp3": digits_mlp3,
    "digits_cnn": digits_cnn,
}
