"""ONNX Runtime sessions over the caller's buffer, through ORT's C API (ctypes).

Why not `onnxruntime.InferenceSession`: its Python binding takes the model as a `std::string`
argument, so pybind11 copies the bytes into a temporary that dies when the constructor returns.
With `session.use_ort_model_bytes_directly` ORT would then keep a pointer into freed memory
(it crashes: tested with onnxruntime 1.31.1), and without it ORT copies the model again. The C
API's `CreateSessionFromArray` takes a pointer and a length, so with
`session.use_ort_model_bytes_directly` and `session.use_ort_model_bytes_for_initializers` an
ORT-format model's graph and weights are read in place from the decrypted buffer: the model
exists in memory once. The buffer is exported to ctypes for the session's whole life (a
bytearray with an export cannot be resized or freed), and released only after the session is.

The library is the `libonnxruntime` shipped inside the onnxruntime wheel the runtime already
imports (the same distribution and version, hence the same measurement); its version must
equal `onnxruntime.__version__`. Only tensor inputs and outputs of the types the runtime's
codec carries are supported here; anything else makes `NativeUnsupported`, and the backend
falls back to the Python binding.

Function-table indices are positions in `OrtApi` (onnxruntime_c_api.h). The table is append-only
across ORT versions; every function used here dates from API versions 1 to 4.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
import weakref
from typing import Any

import numpy as np
import onnxruntime

API_VERSION = 13  # any version the library supports serves: the indices below never move

# ONNXTensorElementDataType ↔ numpy, restricted to what veil.runtime.tensors carries
_ELEMENT_TYPES = {
    1: np.dtype("float32"),
    2: np.dtype("uint8"),
    3: np.dtype("int8"),
    6: np.dtype("int32"),
    7: np.dtype("int64"),
    9: np.dtype("bool"),
    10: np.dtype("float16"),
    11: np.dtype("float64"),
}
_TYPE_OF = {dtype: code for code, dtype in _ELEMENT_TYPES.items()}
# OrtErrorCode → the exception class name the Python binding would raise (same error texts)
_ERROR_NAMES = {
    1: "Fail",
    2: "InvalidArgument",
    3: "NoSuchFile",
    4: "NoModel",
    5: "EngineError",
    6: "RuntimeException",
    7: "InvalidProtobuf",
    8: "ModelLoaded",
    9: "NotImplemented",
    10: "InvalidGraph",
    11: "EPFail",
}
ONNX_TYPE_TENSOR = 1
ORT_LOGGING_LEVEL_ERROR = 3
ORT_DISABLE_ALL = 0

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_SIZE = ctypes.c_size_t
_I64P = ctypes.POINTER(ctypes.c_int64)

# name: (index in OrtApi, return type, argument types)
_FUNCTIONS: dict[str, tuple[int, Any, tuple[Any, ...]]] = {
    "GetErrorCode": (1, ctypes.c_int, (_P,)),
    "GetErrorMessage": (2, ctypes.c_char_p, (_P,)),
    "CreateEnv": (3, _P, (ctypes.c_int, ctypes.c_char_p, _PP)),
    "CreateSessionFromArray": (8, _P, (_P, _P, _SIZE, _P, _PP)),
    "Run": (
        9,
        _P,
        (_P, _P, ctypes.POINTER(ctypes.c_char_p), _PP, _SIZE, ctypes.POINTER(ctypes.c_char_p), _SIZE, _PP),
    ),
    "CreateSessionOptions": (10, _P, (_PP,)),
    "SetSessionLogSeverityLevel": (22, _P, (_P, ctypes.c_int)),
    "SetSessionGraphOptimizationLevel": (23, _P, (_P, ctypes.c_int)),
    "SetIntraOpNumThreads": (24, _P, (_P, ctypes.c_int)),
    "SetInterOpNumThreads": (25, _P, (_P, ctypes.c_int)),
    "SessionGetInputCount": (30, _P, (_P, ctypes.POINTER(_SIZE))),
    "SessionGetOutputCount": (31, _P, (_P, ctypes.POINTER(_SIZE))),
    "SessionGetInputTypeInfo": (33, _P, (_P, _SIZE, _PP)),
    "SessionGetOutputTypeInfo": (34, _P, (_P, _SIZE, _PP)),
    "SessionGetInputName": (36, _P, (_P, _SIZE, _P, _PP)),
    "SessionGetOutputName": (37, _P, (_P, _SIZE, _P, _PP)),
    "CreateTensorWithDataAsOrtValue": (49, _P, (_P, _P, _SIZE, _I64P, _SIZE, ctypes.c_int, _PP)),
    "GetTensorMutableData": (51, _P, (_P, _PP)),
    "CastTypeInfoToTensorInfo": (55, _P, (_P, _PP)),
    "GetOnnxTypeFromTypeInfo": (56, _P, (_P, ctypes.POINTER(ctypes.c_int))),
    "GetTensorElementType": (60, _P, (_P, ctypes.POINTER(ctypes.c_int))),
    "GetDimensionsCount": (61, _P, (_P, ctypes.POINTER(_SIZE))),
    "GetDimensions": (62, _P, (_P, _I64P, _SIZE)),
    "GetSymbolicDimensions": (63, _P, (_P, ctypes.POINTER(ctypes.c_char_p), _SIZE)),
    "GetTensorTypeAndShape": (65, _P, (_P, _PP)),
    "CreateCpuMemoryInfo": (69, _P, (ctypes.c_int, ctypes.c_int, _PP)),
    "AllocatorFree": (76, _P, (_P, _P)),
    "GetAllocatorWithDefaultOptions": (78, _P, (_PP,)),
    "ReleaseStatus": (93, None, (_P,)),
    "ReleaseSession": (95, None, (_P,)),
    "ReleaseValue": (96, None, (_P,)),
    "ReleaseTypeInfo": (98, None, (_P,)),
    "ReleaseTensorTypeAndShapeInfo": (99, None, (_P,)),
    "ReleaseSessionOptions": (100, None, (_P,)),
    "AddSessionConfigEntry": (130, _P, (_P, ctypes.c_char_p, ctypes.c_char_p)),
}

# What an ORT-format session is created with: no graph optimisation (the owner's offline
# conversion did it; ORT skips transformers for ORT-format models anyway, this makes it explicit),
# the model read in place, and no weight prepacking (a prepacked copy of every MatMul/Conv weight
# would double the model's memory, since the originals live in the caller's buffer).
ORT_FORMAT_CONFIG = {
    "session.load_model_format": "ORT",
    "session.use_ort_model_bytes_directly": "1",
    "session.use_ort_model_bytes_for_initializers": "1",
    "session.disable_prepacking": "1",
}


class NativeError(Exception):
    """An ORT C API call failed. `name` is the ORT error class (e.g. InvalidArgument); `detail`
    is ORT's message, which may name tensors and shapes: log or answer only `name`."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(name)
        self.name = name
        self.detail = detail


class NativeUnsupported(Exception):
    """This model or platform cannot take the C API path (use the Python binding)."""


def _library_path() -> str:
    here = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    version = onnxruntime.__version__
    for pattern in (f"libonnxruntime.so.{version}", f"libonnxruntime.{version}.dylib", "onnxruntime.dll"):
        found = sorted(glob.glob(os.path.join(here, pattern)))
        if found:
            return found[0]
    raise NativeUnsupported(f"no libonnxruntime {version} in {here}")


class _Api:
    """The loaded library, its function table, one environment, CPU memory info, the default
    allocator. Created once per process (`api()`), never released."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_library_path())

        class ApiBase(ctypes.Structure):
            _fields_ = (
                ("GetApi", ctypes.CFUNCTYPE(_P, ctypes.c_uint32)),
                ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p)),
            )

        lib.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
        base = lib.OrtGetApiBase().contents
        version = (base.GetVersionString() or b"").decode()
        if version != onnxruntime.__version__:
            raise NativeUnsupported(f"libonnxruntime is {version}, the onnxruntime package {onnxruntime.__version__}")
        table_address = base.GetApi(API_VERSION)
        if not table_address:
            raise NativeUnsupported(f"libonnxruntime {version} does not offer API version {API_VERSION}")
        table = ctypes.cast(table_address, ctypes.POINTER(ctypes.c_void_p))
        self._lib = lib  # keeps the library loaded
        self.version = version
        for name, (index, restype, argtypes) in _FUNCTIONS.items():
            setattr(self, name, ctypes.CFUNCTYPE(restype, *argtypes)(table[index]))
        self.env = _P()
        self.check(self.CreateEnv(ORT_LOGGING_LEVEL_ERROR, b"veil", ctypes.byref(self.env)))
        self.cpu = _P()
        self.check(self.CreateCpuMemoryInfo(0, 0, ctypes.byref(self.cpu)))  # device allocator, default mem
        self.allocator = _P()
        self.check(self.GetAllocatorWithDefaultOptions(ctypes.byref(self.allocator)))

    def check(self, status: int | None) -> None:
        if not status:
            return
        try:
            name = _ERROR_NAMES.get(self.GetErrorCode(status), "Fail")
            detail = (self.GetErrorMessage(status) or b"").decode(errors="replace")
        finally:
            self.ReleaseStatus(status)
        raise NativeError(name, detail)

    def take_string(self, pointer: ctypes.c_void_p) -> str:
        """A string ORT allocated with the default allocator, freed here."""
        try:
            return ctypes.string_at(pointer).decode()
        finally:
            self.check(self.AllocatorFree(self.allocator, pointer))


_api: _Api | None = None
_api_error: NativeUnsupported | None = None
_api_lock = threading.Lock()


def api() -> _Api:
    """The process's C API handle (NativeUnsupported, remembered, when the library is unusable)."""
    global _api, _api_error
    with _api_lock:
        if _api is None and _api_error is None:
            try:
                _api = _Api()
            except (OSError, AttributeError, NativeError) as exc:
                _api_error = NativeUnsupported(f"ONNX Runtime C API unavailable: {type(exc).__name__}")
            except NativeUnsupported as exc:
                _api_error = exc
        if _api is None:
            assert _api_error is not None
            raise _api_error
        return _api


def _release_session(a: _Api, session: int, _keepalive: object) -> None:
    """Finaliser: the session first, then (by dropping `_keepalive`) the buffer it reads."""
    a.ReleaseSession(session)


class NativeSession:
    """A session reading an ORT-format model in place from `buffer` (a bytearray), which stays
    exported and alive until the session is released. `run` is thread-safe (ORT's Run is)."""

    def __init__(self, buffer: bytearray, *, intra_op_threads: int = 1) -> None:
        a = api()
        self._api = a
        self.buffer = buffer
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)  # pins the bytearray
        options = _P()
        a.check(a.CreateSessionOptions(ctypes.byref(options)))
        session = _P()
        try:
            a.check(a.SetIntraOpNumThreads(options, intra_op_threads))
            a.check(a.SetInterOpNumThreads(options, 1))
            a.check(a.SetSessionLogSeverityLevel(options, ORT_LOGGING_LEVEL_ERROR))
            a.check(a.SetSessionGraphOptimizationLevel(options, ORT_DISABLE_ALL))
            for key, value in ORT_FORMAT_CONFIG.items():
                a.check(a.AddSessionConfigEntry(options, key.encode(), value.encode()))
            address, size = ctypes.addressof(view), len(buffer)
            a.check(a.CreateSessionFromArray(a.env, address, size, options, ctypes.byref(session)))
        finally:
            a.ReleaseSessionOptions(options)
        self._session = session
        self.graph_optimization_level = ORT_DISABLE_ALL  # what the session was created with
        self.config = dict(ORT_FORMAT_CONFIG)
        self._finalizer = weakref.finalize(self, _release_session, a, session.value, view)
        self._finalizer.atexit = False  # the process is ending: its memory goes with it
        try:
            self.inputs = self._signature(a.SessionGetInputCount, a.SessionGetInputName, a.SessionGetInputTypeInfo)
            self.outputs = self._signature(a.SessionGetOutputCount, a.SessionGetOutputName, a.SessionGetOutputTypeInfo)
        except BaseException:
            self.close()
            raise
        self._input_names = {name: name.encode() for name in self.inputs}
        self._output_names = (ctypes.c_char_p * len(self.outputs))(*(n.encode() for n in self.outputs))

    def close(self) -> None:
        self._finalizer()

    def _signature(self, count_fn: Any, name_fn: Any, info_fn: Any) -> dict[str, tuple[np.dtype, list]]:
        """{name: (numpy dtype, shape)} with ORT's shape convention: an int per fixed dimension,
        the symbolic name (or None) per free one. NativeUnsupported for non-tensors and for
        element types the runtime's codec does not carry."""
        a = self._api
        n = _SIZE()
        a.check(count_fn(self._session, ctypes.byref(n)))
        out: dict[str, tuple[np.dtype, list]] = {}
        for i in range(n.value):
            raw = _P()
            a.check(name_fn(self._session, i, a.allocator, ctypes.byref(raw)))
            name = a.take_string(raw)
            info = _P()
            a.check(info_fn(self._session, i, ctypes.byref(info)))
            try:
                kind = ctypes.c_int()
                a.check(a.GetOnnxTypeFromTypeInfo(info, ctypes.byref(kind)))
                if kind.value != ONNX_TYPE_TENSOR:
                    raise NativeUnsupported(f"{name}: not a tensor (ONNX type {kind.value})")
                tensor = _P()  # owned by `info`
                a.check(a.CastTypeInfoToTensorInfo(info, ctypes.byref(tensor)))
                elem = ctypes.c_int()
                a.check(a.GetTensorElementType(tensor, ctypes.byref(elem)))
                if elem.value not in _ELEMENT_TYPES:
                    raise NativeUnsupported(f"{name}: element type {elem.value}")
                rank = _SIZE()
                a.check(a.GetDimensionsCount(tensor, ctypes.byref(rank)))
                dims = (ctypes.c_int64 * rank.value)()
                symbols = (ctypes.c_char_p * rank.value)()
                a.check(a.GetDimensions(tensor, dims, rank.value))
                a.check(a.GetSymbolicDimensions(tensor, symbols, rank.value))
            finally:
                a.ReleaseTypeInfo(info)
            shape = [d if d >= 0 else (s.decode() if s else None) for d, s in zip(dims, symbols, strict=True)]
            out[name] = (_ELEMENT_TYPES[elem.value], shape)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in `self.outputs` order; `feeds` must name every input with its dtype."""
        a = self._api
        # native byte order, C order (a no-op for what the tensor codec decodes); ORT reads these
        # arrays in place, so they stay referenced here until Run returns
        arrays = [np.ascontiguousarray(feeds[name], dtype=dtype) for name, (dtype, _) in self.inputs.items()]
        values = (ctypes.c_void_p * len(arrays))()
        outputs = (ctypes.c_void_p * len(self.outputs))()
        try:
            for i, arr in enumerate(arrays):
                shape = (ctypes.c_int64 * arr.ndim)(*arr.shape)
                value = _P()
                a.check(
                    a.CreateTensorWithDataAsOrtValue(
                        a.cpu, arr.ctypes.data, arr.nbytes, shape, arr.ndim, _TYPE_OF[arr.dtype], ctypes.byref(value)
                    )
                )
                values[i] = value.value
            names = (ctypes.c_char_p * len(arrays))(*(self._input_names[n] for n in self.inputs))
            a.check(a.Run(self._session, None, names, values, len(arrays), self._output_names, len(outputs), outputs))
            return [self._to_numpy(outputs[i]) for i in range(len(outputs))]
        finally:
            for v in (*values, *outputs):
                if v:
                    a.ReleaseValue(v)

    def _to_numpy(self, value: int) -> np.ndarray:
        """A copy of an output tensor (ORT's memory is released right after)."""
        a = self._api
        info = _P()
        a.check(a.GetTensorTypeAndShape(value, ctypes.byref(info)))
        try:
            elem = ctypes.c_int()
            a.check(a.GetTensorElementType(info, ctypes.byref(elem)))
            rank = _SIZE()
            a.check(a.GetDimensionsCount(info, ctypes.byref(rank)))
            dims = (ctypes.c_int64 * rank.value)()
            a.check(a.GetDimensions(info, dims, rank.value))
        finally:
            a.ReleaseTensorTypeAndShapeInfo(info)
        dtype = _ELEMENT_TYPES.get(elem.value)
        if dtype is None:
            raise NativeError("NotImplemented", f"output element type {elem.value}")
        shape = tuple(dims)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        data = _P()
        a.check(a.GetTensorMutableData(value, ctypes.byref(data)))
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(data.value)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
