"""ReLU, sigmoid and tanh models: fitted low-degree polynomials, the change reported at compile
time, refusal past the owner's threshold, and encrypted agreement with the approximated plan."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.he import store
from veil.he.action import HEAction
from veil.he.approx import fit
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.errors import PlanError


@pytest.fixture(scope="module")
def relu_mlp(mlp_task):
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0).fit(
            mlp_task.x_train, mlp_task.y_train
        )


def test_fit_is_least_squares_over_the_range():
    values = np.random.default_rng(0).normal(0, 2, 5000)
    coeffs, stats = fit("relu", values, 2)
    assert stats["lo"] < -5 and stats["hi"] > 5
    assert coeffs[2] > 0  # a relu fit is convex
    assert stats["mean_abs_error"] < 0.25


def test_relu_mlp_is_approximated_reported_and_served(tmp_path, relu_mlp, mlp_task):
    compiled = compile_model(relu_mlp, mlp_task.x_train, name="relu", verify_samples=8)
    report = compiled.meta["approximation"]
    assert report["activations"][0]["kind"] == "relu" and report["degree"] in (1, 2)
    assert report["prediction_change"] <= report["threshold"]
    x = mlp_task.x_test
    approx_pred = compiled.predict_plain(x).argmax(1)
    assert np.mean(approx_pred == relu_mlp.predict(x)) >= 0.95  # the accuracy cost is small and reported
    store.publish(tmp_path, "relu", compiled)
    remote = RemoteModel(
        HEClient(store.client_spec(tmp_path, "relu")), ActionTransport(HEAction({"store": str(tmp_path)})), "relu"
    )
    res = remote.infer(x[:4], packing="latency")
    np.testing.assert_allclose(res.scores, compiled.predict_plain(x[:4]), atol=1e-4)


def test_approximation_past_the_threshold_is_refused(relu_mlp, mlp_task):
    with pytest.raises(PlanError, match="relu.*threshold 0.0%"):
        compile_model(relu_mlp, mlp_task.x_train, max_approx_change=0.0)


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh"])
def test_onnx_sigmoid_and_tanh(op, mlp_task):
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(0, 0.05, (8, 64)), rng.normal(0, 3.0, (10, 8))  # pre-activations within a few units
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "W1"), (w2, "W2"))]
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], transB=1),
        helper.make_node(op, ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    compiled = compile_model(model, mlp_task.x_train, max_approx_change=0.05)
    report = compiled.meta["approximation"]
    assert report["activations"][0]["kind"] == {"Sigmoid": "logistic", "Tanh": "tanh"}[op]
    assert report["prediction_change"] <= 0.05


def test_cli_reports_the_accuracy_change_and_the_owner_threshold(tmp_path, relu_mlp, mlp_task):
    """`veil he compile` prints what the approximation changed and refuses past --max-approx-change."""
    import pickle

    from click.testing import CliRunner

    from veil.cli.he import he

    model, calib = tmp_path / "relu.pkl", tmp_path / "calib.npy"
    model.write_bytes(pickle.dumps(relu_mlp))
    np.save(calib, mlp_task.x_train)
    base = ["compile", str(model), "--calib", str(calib), "--model-id", "relu", "--verify-samples", "0"]
    ok = CliRunner().invoke(he, [*base, "--out", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert "approximated relu" in ok.output and "of calibration predictions (threshold 2.00%)" in ok.output
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["meta"]["approximation"]
    assert 0 <= report["prediction_change"] <= 0.02 and report["threshold"] == 0.02
    refused = CliRunner().invoke(he, [*base, "--max-approx-change", "0", "--out", str(tmp_path / "no")])
    assert refused.exit_code != 0 and "threshold 0.0%" in refused.output
    assert not (tmp_path / "no").exists()
