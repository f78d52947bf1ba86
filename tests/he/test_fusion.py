import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from veil.he.compiler import from_onnx, from_sklearn
from veil.he.errors import PlanError
from veil.he.fusion import fuse
from veil.he.plan import Affine, Plan, Poly
from veil.he.train import train_poly_mlp


def test_scaler_and_lr_fuse_to_one_affine(lr_task):
    plan = from_sklearn(lr_task.model)
    assert len(plan.ops) == 2
    fused = fuse(plan)
    assert len(fused.layers) == 1 and not fused.layers[0].square
    x = lr_task.x_test
    np.testing.assert_allclose(fused.evaluate(x)[:, 0], lr_task.model.decision_function(x), rtol=1e-9, atol=1e-9)


def test_compiled_input_normalisation_is_exact(lr_task, lr_compiled):
    x = lr_task.x_test
    np.testing.assert_allclose(lr_compiled.predict_plain(x)[:, 0], lr_task.model.decision_function(x), atol=1e-9)
    assert np.all(np.log2(lr_compiled.input_scale) == np.round(np.log2(lr_compiled.input_scale)))


def test_mlp_fused_equals_unfused(mlp_task, mlp_compiled):
    x = mlp_task.x_test
    np.testing.assert_allclose(mlp_compiled.predict_plain(x), mlp_task.model.decision_function(x), atol=1e-8)
    assert [layer.square for layer in mlp_compiled.plan.layers] == [True, False]


def test_general_quadratic_activation_folds_into_weights(mlp_task):
    model = train_poly_mlp(
        mlp_task.x_train[:300], mlp_task.y_train[:300], hidden=(16, 8), act_coeffs=(0.1, 0.5, 0.25), epochs=3
    )
    plan = from_sklearn(model)
    fused = fuse(plan)
    assert len(fused.layers) == 3 and fused.n_squares == 2
    x = mlp_task.x_test
    np.testing.assert_allclose(fused.evaluate(x), model.decision_function(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["LinearSVC", "LinearRegression", "SVC"])
def test_other_linear_models(lr_task, name):
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    est = {"LinearSVC": LinearSVC(), "LinearRegression": LinearRegression(), "SVC": SVC(kernel="linear")}[name]
    model = make_pipeline(StandardScaler(), est).fit(lr_task.x_train, lr_task.y_train)
    fused = fuse(from_sklearn(model))
    x = lr_task.x_test
    ref = model.predict(x) if name == "LinearRegression" else model.decision_function(x)
    np.testing.assert_allclose(fused.evaluate(x)[:, 0], ref, rtol=1e-8, atol=1e-8)


def test_unsupported_models_are_refused(lr_task):
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    with pytest.raises(PlanError, match="rbf"):
        from_sklearn(SVC().fit(lr_task.x_train, lr_task.y_train))
    relu = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5).fit(lr_task.x_train[:50], lr_task.y_train[:50])
    with pytest.raises(PlanError, match="relu"):  # never fused as is: the compiler approximates it first
        fuse(from_sklearn(relu))
    with pytest.raises(PlanError, match="degree 3"):
        fuse(Plan([Affine(np.eye(2), np.zeros(2)), Poly((0, 0, 0, 1.0))], 2, "regression"))


def _onnx_mlp(w1, b1, w2, b2, coeffs):
    c0, c1, c2 = coeffs
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in [
            (w1, "W1"),
            (b1, "B1"),
            (w2, "W2"),
            (b2, "B2"),
            (np.array(c2, np.float32), "c2"),
            (np.array(c1, np.float32), "c1"),
            (np.array(c0, np.float32), "c0"),
        ]
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
        helper.make_node("Mul", ["h", "h"], ["hh"]),
        helper.make_node("Mul", ["hh", "c2"], ["a2"]),
        helper.make_node("Mul", ["h", "c1"], ["a1"]),
        helper.make_node("Add", ["a2", "a1"], ["s"]),
        helper.make_node("Add", ["s", "c0"], ["act"]),
        helper.make_node("MatMul", ["act", "W2"], ["z"]),
        helper.make_node("Add", ["z", "B2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "poly_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w1.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w2.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_onnx_graph_fused_equals_onnxruntime():
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(0, 0.3, (8, 12)), rng.normal(0, 0.1, 8)
    w2, b2 = rng.normal(0, 0.3, (8, 3)), rng.normal(0, 0.1, 3)
    model = _onnx_mlp(w1, b1, w2, b2, (0.2, 0.5, 0.3))
    onnx.checker.check_model(model)
    plan = from_onnx(model)
    fused = fuse(plan)
    assert fused.n_squares == 1 and len(fused.layers) == 2
    x = rng.normal(0, 1, (20, 12)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused.evaluate(x), ref, rtol=1e-4, atol=1e-4)


def test_onnx_unsupported_op_refused():
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    with pytest.raises(PlanError, match="Abs"):
        from_onnx(helper.make_model(graph))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(["affine", "poly", "linpoly"]), min_size=1, max_size=6),
    st.integers(0, 2**16),
)
def test_fusion_preserves_any_chain(kinds, seed):
    rng = np.random.default_rng(seed)
    width, ops = 5, []
    for kind in kinds:
        if kind == "affine":
            out = int(rng.integers(1, 6))
            ops.append(Affine(rng.normal(0, 0.5, (out, width)), rng.normal(0, 0.5, out)))
            width = out
        elif kind == "poly":
            ops.append(Poly((float(rng.normal()), float(rng.normal()), float(rng.uniform(0.1, 1)))))
        else:
            ops.append(Poly((float(rng.normal()), float(rng.normal()))))
    plan = Plan(ops, 5, "regression")
    fused = fuse(plan)
    assert not fused.layers[-1].square
    assert fused.n_squares == kinds.count("poly")
    x = rng.normal(0, 1, (7, 5))
    np.testing.assert_allclose(fused.evaluate(x), plan.evaluate(x), rtol=1e-7, atol=1e-7)
