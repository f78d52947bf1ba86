"""Compile-time guarantees: what `veil he compile` accepts runs, at every batch size it advertises,
within the stated precision (real SEAL ciphertexts through HEAction); what would not fit is
refused at compile time naming the layer and the value.

The model zoo covers every linear transform the front end fuses (scalers of every kind, PCA,
TruncatedSVD, LDA, feature selection) and the linear models behind them, including the Wine
LR whose bias (20.8) used to overflow SEAL's encoder at request time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from veil.he import store
from veil.he.action import HEAction
from veil.he.bounds import analyse, verify
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model, compile_plan, input_normalisation
from veil.he.errors import HEError, PlanError
from veil.he.fusion import fuse
from veil.he.packing import throughput_group
from veil.he.params import CKKSParams
from veil.he.plan import Affine, Plan

PRECISION = 1e-4


def _data(name: str):
    from sklearn import datasets

    loader = {
        "wine": datasets.load_wine,
        "cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
        "diabetes": datasets.load_diabetes,
    }[name]
    return loader(return_X_y=True)


def _zoo(case: str):
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.feature_selection import SelectKBest
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler, MinMaxScaler, RobustScaler, StandardScaler
    from sklearn.svm import LinearSVC

    data, steps = {
        "wine_lr": ("wine", [StandardScaler(), LogisticRegression(max_iter=3000)]),
        "cancer_pca_lr": ("cancer", [StandardScaler(), PCA(8), LogisticRegression(max_iter=3000)]),
        "wine_robust_svd_svc": ("wine", [RobustScaler(), TruncatedSVD(5, random_state=0), LinearSVC()]),
        "iris_maxabs_lda": ("iris", [MaxAbsScaler(), LinearDiscriminantAnalysis()]),
        "cancer_lda_transform_lr": (
            "cancer",
            [StandardScaler(), LinearDiscriminantAnalysis(n_components=1), LogisticRegression()],
        ),
        "diabetes_minmax_ridge": ("diabetes", [MinMaxScaler(), Ridge(alpha=0.1)]),
        "wine_select_ridgeclf": ("wine", [StandardScaler(), SelectKBest(k=6), RidgeClassifier()]),
        "diabetes_linreg": ("diabetes", [LinearRegression()]),
    }[case]
    x, y = _data(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(*steps).fit(x, y)
    return model, x


def _serve(tmp_path, compiled, name: str) -> RemoteModel:
    store.publish(tmp_path, name, compiled)
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    remote = RemoteModel(HEClient(store.client_spec(tmp_path, name)), ActionTransport(action), name)
    remote.upload_keys()
    return remote


def _every_batch(remote: RemoteModel, compiled, x: np.ndarray, full_groups: bool) -> None:
    """Latency at 1, a full ciphertext and one more; throughput at 3 and (small rings) a group + 1."""
    per = compiled.latency_layout().samples_per_ciphertext
    group = throughput_group(compiled.params.slots)
    sizes = [("latency", 1), ("latency", per), ("latency", per + 1), ("throughput", 3)]
    if full_groups:
        sizes.append(("throughput", group + 1))
    for packing, batch in sizes:
        xs = np.resize(x, (batch, x.shape[1]))
        res = remote.infer(xs, packing=packing)
        ref = compiled.predict_plain(xs)
        assert res.scores.shape == ref.shape, (packing, batch)
        err = float(np.max(np.abs(res.scores - ref)))
        assert err <= PRECISION, (packing, batch, err)
        if compiled.plan.output != "regression":
            assert np.array_equal(res.predictions, remote.client.predict(ref)), (packing, batch)


@pytest.mark.parametrize(
    "case",
    [
        "wine_lr",
        "cancer_pca_lr",
        "wine_robust_svd_svc",
        "iris_maxabs_lda",
        "cancer_lda_transform_lr",
        "diabetes_minmax_ridge",
        "wine_select_ridgeclf",
        "diabetes_linreg",
    ],
)
def test_linear_zoo_fuses_to_one_layer_and_runs_at_every_batch_size(tmp_path, case):
    model, x = _zoo(case)
    compiled = compile_model(model, x, precision=PRECISION, name=case, verify_samples=16)
    assert len(compiled.plan.layers) == 1 and not compiled.plan.layers[0].square  # fused into one affine map
    ref = model.predict(x) if compiled.plan.output == "regression" else model.decision_function(x)
    np.testing.assert_allclose(compiled.predict_plain(x).reshape(np.shape(ref)), ref, rtol=1e-7, atol=1e-7)
    assert min(compiled.meta["headroom_bits"].values()) >= 0
    assert max(compiled.meta["measured_error"].values()) <= PRECISION
    remote = _serve(tmp_path, compiled, case.replace("_", "-"))
    _every_batch(remote, compiled, x, full_groups=True)


def test_wine_lr_bsgs_is_served_or_refused_at_compile_time(tmp_path):
    """The issue's second failure: batch mode of the Wine LR with the bsgs program."""
    model, x = _zoo("wine_lr")
    try:
        compiled = compile_model(model, x, precision=PRECISION, latency="bsgs", verify_samples=16, name="wb")
    except PlanError as exc:  # refused here, never at request time
        assert "error" in exc.message or "layer" in exc.message
        return
    remote = _serve(tmp_path, compiled, "wine-bsgs")
    _every_batch(remote, compiled, x, full_groups=True)


def test_bounds_cover_partial_sums_not_just_outputs():
    """Wine: the bias alone is larger than the output range; the partial sums larger still."""
    model, x = _zoo("wine_lr")
    from veil.he.compiler import from_sklearn

    fused = fuse(from_sklearn(model))
    scale = input_normalisation(x)
    fused.layers[0].affine = Affine(fused.layers[0].affine.weight * scale, fused.layers[0].affine.bias)
    (bound,) = analyse(fused, x / scale, margin=1.0)
    assert bound.bias > 20 and bound.partial > bound.output and bound.partial >= bound.bias
    assert fused.ranges == [bound.peak]


def test_a_value_that_cannot_fit_is_refused_naming_layer_and_value(mlp_compiled, mlp_task):
    """Hand the checker a chain too short for the MLP's values: refused, with the numbers."""
    from dataclasses import replace

    x = mlp_task.x_train / mlp_compiled.input_scale
    bounds = analyse(mlp_compiled.plan, x)
    small = replace(mlp_compiled.params, coeff_bits=(30, *mlp_compiled.params.coeff_bits[1:]))
    tight = type(mlp_compiled)(mlp_compiled.plan, small, mlp_compiled.input_scale, "t", {}, mlp_compiled.latency)
    with pytest.raises(PlanError, match=r"layer 1 \(32->10, latency\): (output|partial sum|bias) [0-9.]+ at scale 2\^"):
        verify(tight, bounds)
    assert isinstance(small, CKKSParams)


def test_outsized_values_are_refused_at_compile_time():
    """Weights so large no 60-bit prime holds them at any useful scale: a compile-time refusal."""
    rng = np.random.default_rng(0)
    plan = Plan([Affine(rng.normal(0, 1e9, (3, 4)), np.zeros(3))], 4, "regression")
    with pytest.raises(HEError) as err:  # unsupported_model or insecure_parameters, never a served model
        compile_plan(plan, rng.uniform(-1, 1, (50, 4)))
    assert "bits" in err.value.message


def test_cnn_runs_at_its_batch_sizes(tmp_path, cnn_task, cnn_compiled):
    """The CNN: several samples per latency ciphertext, one more spills into a second."""
    assert max(cnn_compiled.meta["measured_error"].values()) <= PRECISION
    remote = _serve(tmp_path, cnn_compiled, "cnn")
    _every_batch(remote, cnn_compiled, cnn_task.x_test, full_groups=False)


def test_two_squares_in_throughput_fill_both_halves_of_the_slots(tmp_path):
    """A full throughput group puts samples in the imaginary halves too: with two squares only the
    square right after the split may undo its sign (this used to negate the second one)."""
    from sklearn.datasets import load_iris

    from veil.he.train import train_poly_mlp

    x, y = load_iris(return_X_y=True)
    model = train_poly_mlp(x / 8.0, y, hidden=(4, 4), epochs=30, seed=0)
    compiled = compile_model(model, x / 8.0, precision=1e-3, name="sq2", verify_samples=4)
    assert compiled.plan.n_squares == 2
    remote = _serve(tmp_path, compiled, "sq2")
    xs = np.resize(x / 8.0, (throughput_group(compiled.params.slots), 4))
    res = remote.infer(xs, packing="throughput")
    np.testing.assert_allclose(res.scores, compiled.predict_plain(xs), atol=1e-3)
