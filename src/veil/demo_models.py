"""The demo's models: scikit-learn models trained on data sets that ship with scikit-learn,
converted to ONNX (input "input", float32; outputs without ZipMap, so plain arrays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DemoModel:
    model_id: str
    description: str
    onnx: bytes
    x_test: np.ndarray
    y_test: np.ndarray


def _to_onnx(estimator: object, n_features: int) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        estimator,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(estimator): {"zipmap": False}},
        target_opset=17,
    )
    return onx.SerializeToString()


def train_demo_models(seed: int = 0) -> list[DemoModel]:
    """Breast-cancer logistic regression (with scaler) and a digits MLP."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = []
    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    out.append(
        DemoModel("breast-cancer-lr", "logistic regression, 30 features → benign/malignant", _to_onnx(lr, 30), xte, yte)
    )

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed).fit(xtr, ytr)
    out.append(DemoModel("digits-mlp", "MLP 64→64→10, 8×8 handwritten digits", _to_onnx(mlp, 64), xte, yte))
    return out
