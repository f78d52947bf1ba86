"""ONNX Runtime model backend: a session built from decrypted bytes in memory (never a file).

One session per model is shared by all request threads (`InferenceSession.run` is thread-safe),
so concurrency costs activation memory only. (SeSeMI's model copy per thread, the memory
benchmark's baseline, lives in `bench/`, outside the measured runtime.)

Two formats, told apart by the decrypted bytes themselves (authenticated: they come out of the
sealed file), as ONNX Runtime tells them apart:

- **ORT format** (a flatbuffer with file identifier "ORTM" at bytes 4..8; what an owner's
  `publish(optimize=True)` seals): graph optimisations were done once, offline, by the owner, so
  the session is created with none, and it reads graph and weights in place from the one
  decrypted buffer (`NativeOrtModel`, through ORT's C API: see `ort_native`). The buffer is held
  by the model, hence by its cache entry, for as long as the session lives.
- **ONNX** (protobuf): loaded by ONNX Runtime's Python binding as before (`OnnxModel`), which
  parses and optimises it at session creation.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import onnxruntime as ort

from veil.errors import BadRequest
from veil.runtime import ort_native

log = logging.getLogger("veil.runtime")

ORT_FILE_IDENTIFIER = b"ORTM"  # flatbuffers file identifier of ORT-format models

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


def is_ort_format(data: bytes | bytearray | memoryview) -> bool:
    """Is `data` an ORT-format model (flatbuffer identifier "ORTM"), as ONNX Runtime decides?"""
    return len(data) >= 8 and bytes(data[4:8]) == ORT_FILE_IDENTIFIER


class _Model:
    """What the core needs of a loaded model: `inputs` ({name: (dtype name, shape)}),
    `output_names`, `nbytes` (what the model cache counts), `format` ("onnx" or "ort"),
    `zero_copy` (the session reads the decrypted buffer in place) and `run`."""

    format = "onnx"
    zero_copy = False

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[str | None, list]] = {}
        self.output_names: list[str] = []
        self.nbytes = 0
        self._ran = False
        self._ran_lock = threading.Lock()

    def take_first_run(self) -> bool:
        """True exactly once: for the run that is this session's first (its warm-up)."""
        with self._ran_lock:
            first, self._ran = not self._ran, True
        return first

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
        raise NotImplementedError


class OnnxModel(_Model):
    """A model loaded through ONNX Runtime's Python binding. `run` validates inputs against the
    graph before ONNX Runtime sees them. `ort_format=True` (the fallback for ORT-format models
    the C API path cannot take) loads it as ORT format with graph optimisation off."""

    def __init__(self, model_bytes: bytes, *, intra_op_threads: int = 1, ort_format: bool = False) -> None:
        super().__init__()
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = intra_op_threads
        self._options.inter_op_num_threads = 1
        self._options.log_severity_level = 3
        if ort_format:
            self.format = "ort"
            self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self._options.add_session_config_entry("session.load_model_format", "ORT")
        self.session = self._new_session(model_bytes)
        self.inputs = {i.name: (_ORT_TYPES.get(i.type), i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.nbytes = len(model_bytes)

    def _new_session(self, model_bytes: bytes) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(model_bytes, self._options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types
            raise BadRequest(f"model does not load in ONNX Runtime: {type(exc).__name__}", code="bad_model") from None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(inputs)
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # ORT runtime failure on valid-looking input
            raise BadRequest(f"inference failed: {type(exc).__name__}", code="inference_failed") from None
        return {name: _plain_array(value) for name, value in zip(self.output_names, outputs, strict=True)}


class NativeOrtModel(_Model):
    """An ORT-format model whose session reads `buffer` (the decrypted bytearray) in place, with
    no graph optimisation and no copy of graph or weights. `buffer` is held here (and pinned:
    exported to the session) until the model is dropped."""

    format = "ort"
    zero_copy = True

    def __init__(self, buffer: bytearray, *, intra_op_threads: int = 1) -> None:
        super().__init__()
        try:
            self.session = ort_native.NativeSession(buffer, intra_op_threads=intra_op_threads)
        except ort_native.NativeError as exc:
            raise BadRequest(f"model does not load in ONNX Runtime: {exc.name}", code="bad_model") from None
        self.buffer = buffer
        self.inputs = {name: (dtype.name, shape) for name, (dtype, shape) in self.session.inputs.items()}
        self.output_names = list(self.session.outputs)
        self.nbytes = len(buffer)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(inputs)
        try:
            outputs = self.session.run(feeds)
        except ort_native.NativeError as exc:
            raise BadRequest(f"inference failed: {exc.name}", code="inference_failed") from None
        return dict(zip(self.output_names, outputs, strict=True))


def prepare_loader() -> bool:
    """Load ONNX Runtime's C API now (the library, its environment: ~30 ms), so that the first
    ORT-format model's load does not pay for it. False when it is unavailable (ORT-format models
    then load through the Python binding)."""
    try:
        ort_native.api()
    except ort_native.NativeUnsupported as exc:
        log.warning("ONNX Runtime C API unavailable; ORT-format models will be copied: %s", _reason(exc))
        return False
    return True


def load_model(buffer: bytearray, *, intra_op_threads: int = 1) -> _Model:
    """The model in `buffer` (decrypted plaintext), which this call takes over.

    ORT format: a `NativeOrtModel` over `buffer` itself (or, when the C API path cannot take the
    model, e.g. non-tensor inputs or outputs, an `OnnxModel` in ORT format). ONNX: an `OnnxModel`
    from a bytes copy, and `buffer` is cleared before ONNX Runtime starts, so the plaintext is
    not held twice while the session is built."""
    ort_format = is_ort_format(buffer)
    if ort_format:
        try:
            return NativeOrtModel(buffer, intra_op_threads=intra_op_threads)
        except ort_native.NativeUnsupported as exc:
            log.info("ORT-format model loaded through the Python binding (a copy): %s", _reason(exc))
    data = bytes(buffer)
    buffer.clear()
    return OnnxModel(data, intra_op_threads=intra_op_threads, ort_format=ort_format)


def _reason(exc: Exception) -> str:
    """A short, content-free reason (names of inputs are the owner's, not user data)."""
    return str(exc)[:200]


def _plain_array(value: Any) -> np.ndarray:
    """ONNX outputs can be sequences of maps (scikit-learn probabilities); make them arrays."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)
