"""The input and output signature of an ONNX model, for its model card (owner side only).

Free dimensions (`dim_param`, or no value) become None; scikit-learn's ZipMap outputs (a sequence
of maps, which Veil's runtime turns into an array) are described as float32 [batch, classes?]
with the class count unknown, so the card never claims what the graph does not say.
"""

from __future__ import annotations

from typing import Any

from veil.wire.cards import TensorSpec

# onnx.TensorProto element types (imported lazily: the onnx package takes a second to import,
# and every CLI command loads the SDK)
_ELEM = {1: "float32", 11: "float64", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def _spec(value: Any) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        tensor = value.type.tensor_type
        dtype = _ELEM.get(tensor.elem_type, "float32")
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, dims)
    return TensorSpec(value.name, "float32", (None, None))  # a sequence of maps (ZipMap): rows × classes


def signature(model_bytes: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the graph, initialisers excluded from the inputs."""
    import onnx

    model = onnx.load_model_from_string(model_bytes)
    initialisers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initialisers)
    return inputs, tuple(_spec(v) for v in model.graph.output)
