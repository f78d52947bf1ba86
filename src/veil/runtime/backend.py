"""ONNX Runtime model backend: a session built from decrypted bytes in memory (never a file).

One session per model is shared by all request threads (`InferenceSession.run` is thread-safe),
so concurrency costs activation memory only. (SeSeMI's model copy per thread, the memory
benchmark's baseline, lives in `bench/`, outside the measured runtime.)
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from veil.errors import BadRequest

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(float16)": "float16",
}


class OnnxModel:
    """A loaded model. `run` validates inputs against the graph before ONNX Runtime sees them."""

    def __init__(self, model_bytes: bytes, *, intra_op_threads: int = 1) -> None:
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = intra_op_threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3
        self.session = self._new_session(model_bytes)
        self.inputs = {i.name: (_ORT_TYPES.get(i.type), i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.nbytes = len(model_bytes)

    def _new_session(self, model_bytes: bytes) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(model_bytes, self._options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise BadRequest(f"model does not load in ONNX Runtime: {type(exc).__name__}", code="bad_model") from None

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Names, dtypes and ranks must match the graph; static dimensions must match too."""
        missing = self.inputs.keys() - inputs.keys()
        extra = inputs.keys() - self.inputs.keys()
        if missing or extra:
            raise BadRequest(f"inputs: model expects {sorted(self.inputs)}, got {sorted(inputs)}", code="bad_input")
        for name, (dtype, shape) in self.inputs.items():
            arr = inputs[name]
            if dtype and arr.dtype.name != dtype:
                raise BadRequest(f"inputs.{name}: dtype {arr.dtype.name}, model expects {dtype}", code="bad_input")
            if len(arr.shape) != len(shape):
                raise BadRequest(f"inputs.{name}: rank {arr.ndim}, model expects shape {shape}", code="bad_input")
            for got, want in zip(arr.shape, shape, strict=True):
                if isinstance(want, int) and want > 0 and got != want:
                    raise BadRequest(f"inputs.{name}: shape {list(arr.shape)}, model expects {shape}", code="bad_input")
        return inputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(inputs)
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ORT runtime failure on valid-looking input
            raise BadRequest(f"inference failed: {type(exc).__name__}", code="inference_failed") from None
        return {name: _plain_array(value) for name, value in zip(self.output_names, outputs, strict=True)}


def _plain_array(value: object) -> np.ndarray:
    """ONNX outputs can be sequences of maps (scikit-learn probabilities); make them arrays."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)
