"""ONNX models for the packer benchmark: one MLP per model id, of varied sizes.

Each model is a 3-layer perceptron (64 -> w -> w -> 10, ReLU) with seeded random weights, built
with `onnx.helper`, so loading one into an ONNX Runtime session is a real cold cost in time and
memory that grows with its width. What the weights compute does not matter to packing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN_DIM = 64
OUT_DIM = 10


def widths(n: int, smallest: int = 512, largest: int = 2048) -> list[int]:
    """Hidden widths spread evenly (in parameters) from `smallest` to `largest`."""
    if n == 1:
        return [largest]
    return [int(round(w)) for w in np.sqrt(np.linspace(smallest**2, largest**2, n))]


def build_mlp(width: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dims = [IN_DIM, width, width, OUT_DIM]
    nodes = []
    inits = []
    prev = "x"
    for layer in range(3):
        w = (rng.standard_normal((dims[layer], dims[layer + 1])) / np.sqrt(dims[layer])).astype(np.float32)
        b = np.zeros(dims[layer + 1], dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"W{layer}"), numpy_helper.from_array(b, f"B{layer}")]
        nodes.append(helper.make_node("MatMul", [prev, f"W{layer}"], [f"m{layer}"]))
        out = "y" if layer == 2 else f"a{layer}"
        nodes.append(helper.make_node("Add", [f"m{layer}", f"B{layer}"], [out if layer == 2 else f"z{layer}"]))
        if layer < 2:
            nodes.append(helper.make_node("Relu", [f"z{layer}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        f"mlp{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, OUT_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_models(directory: Path, names: list[str], *, smallest: int = 512, largest: int = 2048) -> dict[str, Path]:
    """Write `<name>.onnx` for each model (cached: existing files are kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for idx, (name, width) in enumerate(zip(names, widths(len(names), smallest, largest), strict=True)):
        path = directory / f"{name}.onnx"
        marker = directory / f"{name}.w{width}"
        if not (path.exists() and marker.exists()):
            onnx.save(build_mlp(width, seed=idx), path)
            marker.write_text(str(width))
        out[name] = path
    return out
