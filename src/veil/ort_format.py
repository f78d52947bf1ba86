"""Owner side: convert an ONNX model to ONNX Runtime's optimised ORT format, once, offline.

ONNX Runtime optimises a graph every time it creates a session from ONNX (constant folding,
node fusions, ...), and parses a protobuf into a second in-memory copy of every weight. An
ORT-format file holds the graph as optimised here, as a flatbuffer a session can read in place:
a Veil runtime creates its session from the decrypted buffer with no optimisation pass and no
copy of the weights (`veil.runtime.backend`). `ModelOwner.publish(..., optimize=True)` (and
`veil owner publish --optimize`) seals this module's output instead of the ONNX file.

This is ONNX Runtime's own conversion (what `python -m onnxruntime.tools.convert_onnx_models_to_ort`
does): a session created with `optimized_model_filepath` and `session.save_model_format=ORT`.
Levels (ONNX Runtime's names):

- "basic": graph rewrites that keep standard ONNX operators (constant folding, redundant node
  elimination, Conv+BatchNorm/Add/Mul folding, ...);
- "extended" (the default): also fusions into ONNX Runtime's own CPU operators (FusedConv,
  FusedMatMul, Gelu, LayerNormalization, attention, ...), which every ONNX Runtime build runs;
- "all": also layout optimisations. NCHWc blocking, which bakes in the x86 vector width of the
  machine converting, stays off unless `hardware_specific=True`, as in ONNX Runtime's tool.

The temporary file ONNX Runtime writes the ORT model to is on the owner's machine, in a private
temporary directory removed afterwards. The runtime never imports this module (it is outside
the runtime's measured code).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from veil.errors import BadRequest

LEVELS = ("basic", "extended", "all")
DEFAULT_LEVEL = "extended"
ORT_FILE_IDENTIFIER = b"ORTM"  # the same check as veil.runtime.backend.is_ort_format


def is_ort_format(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == ORT_FILE_IDENTIFIER


def to_ort(onnx: bytes, *, level: str = DEFAULT_LEVEL, hardware_specific: bool = False, verify: bool = True) -> bytes:
    """The ORT-format model of `onnx`, optimised at `level` for ONNX Runtime's CPU provider.

    `verify` (default) runs both models on one random input (float inputs, free dimensions set
    to 1) and refuses a conversion whose outputs differ beyond float-reordering noise. Raises
    BadRequest (code "bad_model") when ONNX Runtime cannot load or convert the model."""
    import onnxruntime as ort

    if level not in LEVELS:
        raise BadRequest(f"optimization level: one of {', '.join(LEVELS)}, not {level!r}", code="bad_request")
    if is_ort_format(onnx):
        raise BadRequest("the model is already in ORT format", code="bad_model")
    graph_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    disabled = [] if hardware_specific else ["NchwcTransformer"]
    with tempfile.TemporaryDirectory(prefix="veil-ort-") as tmp:
        target = Path(tmp) / "model.ort"
        options = ort.SessionOptions()
        options.graph_optimization_level = graph_level
        options.optimized_model_filepath = str(target)
        options.add_session_config_entry("session.save_model_format", "ORT")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            converted = target.read_bytes()
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise BadRequest(
                f"ONNX Runtime {ort.__version__} cannot convert the model to ORT format: "
                f"{str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__}",
                code="bad_model",
            ) from None
    if not is_ort_format(converted):
        raise BadRequest("ONNX Runtime did not write an ORT-format model", code="bad_model")
    if verify:
        _verify(onnx, converted)
    return converted


def _verify(onnx: bytes, converted: bytes) -> None:
    """Same outputs from the original and the converted model on one random input."""
    import onnxruntime as ort

    def session(data: bytes, **config: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    original = session(onnx)
    feeds = {}
    rng = np.random.default_rng(0)
    for meta in original.get_inputs():
        if meta.type not in ("tensor(float)", "tensor(double)"):
            return  # integer inputs may be indices or lengths: random values prove nothing
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]
        feeds[meta.name] = rng.standard_normal(shape).astype(np.float32 if meta.type == "tensor(float)" else np.float64)
    try:
        want = original.run(None, feeds)
    except Exception:  # noqa: BLE001 - the model does not run on this input (data-dependent shapes)
        return
    got = session(converted, **{"session.load_model_format": "ORT"}).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise BadRequest("the ORT-format model's outputs differ in shape or type", code="bad_model")
        if a.dtype.kind == "f":
            scale = float(np.max(np.abs(a))) if a.size else 0.0
            if not np.allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, scale), equal_nan=True):
                raise BadRequest("the ORT-format model's outputs differ from the original's", code="bad_model")
        elif not np.array_equal(a, b):
            raise BadRequest("the ORT-format model's outputs differ from the original's", code="bad_model")
