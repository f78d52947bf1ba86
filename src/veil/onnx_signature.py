"""The input and output signature of an ONNX model, for its model card (owner side only).

Free dimensions (`dim_param`, or no value) become None; scikit-learn's ZipMap outputs (a sequence
of maps, which Veil's runtime turns into an array) are described as float32 [batch, classes?]
with the class count unknown, so the card never claims what the graph does not say.
"""

from __future__ import annotations

import onnx

from veil.wire.cards import TensorSpec

_ELEM = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        tensor = value.type.tensor_type
        dtype = _ELEM.get(tensor.elem_type, "float32")
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, dims)
    return TensorSpec(value.name, "float32", (None, None))  # a sequence of maps (ZipMap): rows × classes


def signature(model_bytes: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the graph, initialisers excluded from the inputs."""
    model = onnx.load_model_from_string(model_bytes)
    initialisers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initialisers)
    return inputs, tuple(_spec(v) for v in model.graph.output)
