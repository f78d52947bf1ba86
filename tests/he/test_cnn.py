"""Convolutions: ONNX Conv/BatchNormalization/AveragePool/Flatten/Reshape/Add graphs against
onnxruntime, the conv-aware latency program on real SEAL ciphertexts, and a torch export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from veil.he import store
from veil.he.action import HEAction
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.compiler import from_onnx
from veil.he.errors import PlanError
from veil.he.fusion import fuse


def _const(name: str, a: np.ndarray):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _conv_bn_pool_graph(rng: np.random.Generator, flat_input: bool = False):
    """x -> [Reshape] -> Conv(1->4, 3x3, pad 1) -> BatchNorm -> AvgPool(2) -> +bias(C,1,1) -> x*x -> Flatten -> Gemm."""
    inits = [
        _const("K", rng.normal(0, 0.4, (4, 1, 3, 3))),
        _const("KB", rng.normal(0, 0.1, 4)),
        _const("g", rng.uniform(0.5, 1.5, 4)),
        _const("be", rng.normal(0, 0.1, 4)),
        _const("mu", rng.normal(0, 0.1, 4)),
        _const("var", rng.uniform(0.5, 2.0, 4)),
        _const("cb", rng.normal(0, 0.1, (4, 1, 1))),
        _const("W", rng.normal(0, 0.3, (10, 64))),
        _const("B", rng.normal(0, 0.1, 10)),
        numpy_helper.from_array(np.array([-1, 1, 8, 8], np.int64), "shape"),
    ]
    nodes = []
    src = "x"
    if flat_input:
        nodes.append(helper.make_node("Reshape", ["x", "shape"], ["img"]))
        src = "img"
    nodes += [
        helper.make_node("Conv", [src, "K", "KB"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["n"], epsilon=1e-5, name="bn"),
        helper.make_node("AveragePool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Add", ["p", "cb"], ["pb"], name="bias"),
        helper.make_node("Mul", ["pb", "pb"], ["sq"], name="square"),
        helper.make_node("Flatten", ["sq"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1, name="dense"),
    ]
    shape = [None, 64] if flat_input else [None, 1, 8, 8]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def _ort(model, x: np.ndarray, shape: tuple) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString())
    return sess.run(None, {"x": x.reshape(shape).astype(np.float32)})[0]


@pytest.mark.parametrize("flat", [False, True])
def test_conv_bn_pool_graph_fuses_to_one_conv_and_matches_onnxruntime(cnn_task, flat):
    model = _conv_bn_pool_graph(np.random.default_rng(3), flat_input=flat)
    fused = fuse(from_onnx(model))
    # conv, batch norm, pooling and the bias are one layer: a 4x4 kernel with stride 2
    assert len(fused.layers) == 2 and fused.layers[0].square
    geo = fused.layers[0].affine.conv
    assert geo is not None and geo.kernel == (4, 4) and geo.stride == (2, 2) and geo.out_shape == (4, 4, 4)
    x = cnn_task.x_test[:30]
    ref = _ort(model, x, (-1, 64) if flat else (-1, 1, 8, 8))
    np.testing.assert_allclose(fused.evaluate(x), ref, rtol=2e-4, atol=2e-4)


def test_fused_conv_graph_runs_encrypted_in_the_conv_program(tmp_path, cnn_task):
    model = _conv_bn_pool_graph(np.random.default_rng(3))
    compiled = compile_model(model, cnn_task.x_train, name="g", verify_samples=4, latency="conv")
    assert compiled.latency == "conv"
    layout = compiled.latency_layout()
    conv_layer = layout.layers[0]
    # C_in * k * k diagonals whatever the number of output channels, shared rotations
    assert conv_layer.mult_count() == 16 and conv_layer.rotation_count() <= 6
    store.publish(tmp_path, "g", compiled)
    remote = RemoteModel(
        HEClient(store.client_spec(tmp_path, "g")), ActionTransport(HEAction({"store": str(tmp_path)})), "g"
    )
    x = cnn_task.x_test[: layout.samples_per_ciphertext + 2]
    for packing in ("latency", "throughput"):
        res = remote.infer(x, packing=packing)
        np.testing.assert_allclose(res.scores, compiled.predict_plain(x), atol=1e-4)
    ref = _ort(model, x, (-1, 1, 8, 8))
    assert np.array_equal(res.predictions, ref.argmax(1))


def test_reference_cnn_programs(cnn_compiled, cnn_task):
    from veil.he.packing import latency_layout

    # auto: rows with the first layer gathered per output (the client does the im2col): blocks
    # of 2 x 16 slots instead of 2 x 64, 4 + 6 rotations, two plaintext products
    assert cnn_compiled.latency == "rows"
    rows = cnn_compiled.latency_layout()
    assert rows.gather is not None and rows.gather.shape == (64, 9) and rows.n == 16
    assert sum(layer.rotation_count() for layer in rows.layers) == 10
    # conv (on request): multiplexed channels, one diagonal per kernel tap, several samples a ciphertext
    conv = latency_layout(cnn_compiled.plan, cnn_compiled.params.slots, "conv")
    assert conv.samples_per_ciphertext >= 8
    assert conv.layers[0].mult_count() == 9 and conv.layers[0].rotation_count() == 4
    np.testing.assert_allclose(
        cnn_compiled.predict_plain(cnn_task.x_test), cnn_task.model.decision_function(cnn_task.x_test), atol=1e-6
    )


def test_conv_refusals_name_the_problem():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])
    k = _const("K", np.ones((4, 1, 3, 3)))
    flat = helper.make_graph(
        [helper.make_node("Conv", ["x", "K"], ["y"], kernel_shape=[3, 3], name="c1")], "g", [x], [y], [k]
    )
    with pytest.raises(PlanError, match="image input"):
        from_onnx(helper.make_model(flat))
    img = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])
    pool = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], "g", [img], [y])
    with pytest.raises(PlanError, match="AveragePool"):
        from_onnx(helper.make_model(pool))


def test_torch_exported_cnn(tmp_path, cnn_task):
    """A torch model with a flat input (view to an image, as the issue's export did)."""
    torch = pytest.importorskip("torch")

    class Square(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201
            return x * x

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.act = Square()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):  # noqa: ANN001, ANN201
            x = x.view(x.shape[0], 1, 8, 8)
            return self.fc(torch.flatten(self.act(self.bn(self.conv(x))), 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.1, 0.1)
        net.bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    path = tmp_path / "net.onnx"
    sample = torch.zeros(2, 64)
    kwargs = {"input_names": ["x"], "output_names": ["y"], "dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}}
    try:
        torch.onnx.export(net, (sample,), str(path), dynamo=False, **kwargs)
    except TypeError:  # older torch without the dynamo switch
        torch.onnx.export(net, (sample,), str(path), **kwargs)
    compiled = compile_model(path, cnn_task.x_train, name="torch", verify_samples=4)
    x = cnn_task.x_test[:5]
    with torch.no_grad():
        ref = net(torch.tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(compiled.predict_plain(x), ref, rtol=1e-4, atol=1e-4)
    assert compiled.latency in ("rows", "conv")  # a conv first layer: gathered rows or the conv program
    store.publish(tmp_path, "torch", compiled)
    remote = RemoteModel(
        HEClient(store.client_spec(tmp_path, "torch")), ActionTransport(HEAction({"store": str(tmp_path)})), "torch"
    )
    np.testing.assert_allclose(remote.infer(x, packing="latency").scores, compiled.predict_plain(x), atol=1e-4)
