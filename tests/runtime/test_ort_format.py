"""ORT-format models (issue 15, "models that load fast") through the real runtime core.

- An owner's ORT-format conversion (`veil.ort_format.to_ort`) answers as the ONNX original, at
  every level, through the real `RuntimeCore` (real store, real sealing, real ONNX Runtime).
- The session reads the model in place: the cache entry holds the one decrypted buffer, pinned,
  and zeroing a weight's bytes in that buffer changes the next answer, so ONNX Runtime has no
  copy of its own; loading a 64 MiB model allocates no second plaintext-sized block (tracemalloc)
  and peaks at about the model's size in RSS, where the same model as ONNX peaks above twice it.
- No graph re-optimisation at load: ONNX Runtime's own profile of the runtime's session runs
  exactly the nodes of the file as converted ("basic": Conv and Relu apart), where optimising
  at load would fuse them (the original ONNX at ONNX Runtime's default level does); the Python
  fallback's `get_session_options()` says ORT_DISABLE_ALL.
- The cold request's timings split session creation from the first run; a tampered or broken
  ORT model leaves no cache entry; the converter stays outside the runtime's measured code; and
  `ModelOwner.publish(optimize=True)` works end to end with a card built from the original.
"""

from __future__ import annotations

import ctypes
import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from runtime_support import Harness, TrainedModels, reference, refused

from veil.runtime import ort_native, tensors
from veil.runtime.backend import NativeOrtModel, OnnxModel, is_ort_format

USER = "alice"
MiB = 1 << 20


def _model(nodes: list, inits: list, inp: list, out: list) -> bytes:
    graph = helper.make_graph(nodes, "g", inp, out, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def cnn_onnx(seed: int = 0) -> bytes:
    """Conv → BatchNorm → Relu → GlobalAveragePool → Flatten → Gemm: basic optimisation folds the
    BatchNorm into the Conv, extended fuses Conv+Relu into FusedConv."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(f) * 0.3, "cw"),
        numpy_helper.from_array(rng.standard_normal(8).astype(f) * 0.1, "cb"),
        numpy_helper.from_array(rng.random(8).astype(f) + 0.5, "scale"),
        numpy_helper.from_array(rng.standard_normal(8).astype(f) * 0.1, "bias"),
        numpy_helper.from_array(rng.standard_normal(8).astype(f) * 0.1, "mean"),
        numpy_helper.from_array(rng.random(8).astype(f) + 0.5, "var"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(f), "gw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(f), "gb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["fl"]),
        helper.make_node("Gemm", ["fl", "gw", "gb"], ["logits"]),
    ]
    return _model(
        nodes,
        inits,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
    )


def matmul_onnx(rows: int, cols: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """input [n, rows] @ w [rows, cols] → Relu; returns (model, w)."""
    w = (np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) / np.sqrt(rows)).astype(np.float32)
    onnx = _model(
        [helper.make_node("MatMul", ["input", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        [numpy_helper.from_array(w, "w")],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])],
    )
    return onnx, w


def cached(h: Harness, model: str, version: int) -> Any:
    """The model object in the runtime's cache entry for (model, version) (must be there)."""
    value, was_cached = h.core.models.acquire((model, version), lambda: pytest.fail("not cached"))
    h.core.models.release((model, version))
    assert was_cached
    return value


def timed(h: Harness, model: str, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    env = h.request(model, USER, {"input": x}, options=tensors.RequestOptions(timings=True))
    outputs, meta = tensors.decode_with_meta(h.open_answer(env, h.core.infer(env)["envelope"]))
    return outputs, meta["timings"]


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, ref in want.items():
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], ref, err_msg=name)


# -- same answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_ort_models_answer_as_their_onnx_originals_through_the_runtime(
    harness: Harness, trained: TrainedModels, level: str
) -> None:
    from veil.ort_format import to_ort

    h = harness
    cnn = cnn_onnx()
    x_cnn = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    for model, onnx, x in (("lr", trained.v1, trained.x), ("cnn", cnn, x_cnn)):
        converted = to_ort(onnx, level=level)
        assert is_ort_format(converted) and not is_ort_format(onnx)
        h.publish(model, 1, converted)
        h.grant(model, USER)
        assert_close(h.infer(model, USER, {"input": x}), reference(onnx, x))
        loaded = cached(h, model, 1)
        assert isinstance(loaded, NativeOrtModel) and loaded.format == "ort" and loaded.zero_copy
    # a plain ONNX model still loads as before (the Python binding, optimised at load)
    h.publish("plain", 1, cnn)
    h.grant("plain", USER)
    assert_close(h.infer("plain", USER, {"input": x_cnn}), reference(cnn, x_cnn))
    plain = cached(h, "plain", 1)
    assert isinstance(plain, OnnxModel) and plain.format == "onnx" and not plain.zero_copy


def test_ort_model_input_checks_match_the_onnx_path(harness: Harness, trained: TrainedModels) -> None:
    from veil.ort_format import to_ort

    h = harness
    h.publish("lr", 1, to_ort(trained.v1))
    h.grant("lr", USER)
    h.infer("lr", USER, {"input": trained.x})
    assert cached(h, "lr", 1).inputs == OnnxModel(trained.v1).inputs  # same names, dtypes, shapes
    code, message, _ = refused(h, h.request("lr", USER, {"input": trained.x[:, :5]}))
    assert code == "bad_input" and "shape" in message
    code, _, _ = refused(h, h.request("lr", USER, {"input": trained.x.astype(np.float64)}))
    assert code == "bad_input"


# -- no copy -------------------------------------------------------------------------------------


def test_the_session_reads_the_one_buffer_the_cache_entry_holds(harness: Harness) -> None:
    from veil.ort_format import to_ort

    h = harness
    onnx, w = matmul_onnx(256, 128)
    converted = to_ort(onnx)
    h.publish("mm", 1, converted)
    h.grant("mm", USER)
    x = np.abs(np.random.default_rng(2).standard_normal((3, 256))).astype(np.float32)
    before = h.infer("mm", USER, {"input": x})["y"]
    assert before.max() > 0
    loaded = cached(h, "mm", 1)
    buf = loaded.buffer
    assert type(buf) is bytearray and buf == converted and loaded.nbytes == len(converted)
    with pytest.raises(BufferError):  # exported to the live session: cannot move or be freed
        buf.extend(b"\0")
    # ONNX Runtime computes from these very bytes: zero the weight in the cached buffer...
    at = buf.find(w.tobytes())
    assert at > 0 and buf.find(w.tobytes(), at + 1) == -1
    buf[at : at + w.nbytes] = bytes(w.nbytes)
    # ...and the next answer is relu(x @ 0) = 0
    assert np.array_equal(h.infer("mm", USER, {"input": x})["y"], np.zeros_like(before))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: `5` to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _load_peaks(h: Harness, model: str, x: np.ndarray) -> tuple[int, int | None]:
    """(tracemalloc peak, RSS peak above the start) in bytes for the first request of `model`."""
    gc.collect()
    can_reset = _reset_peak()
    rss0 = _rss_kib("VmRSS")
    tracemalloc.start()
    try:
        h.infer(model, USER, {"input": x})
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_peak = (_rss_kib("VmHWM") - rss0) * 1024 if can_reset else None
    return traced_peak, rss_peak


def test_loading_an_ort_model_makes_no_second_plaintext_sized_allocation(harness: Harness) -> None:
    from veil.ort_format import to_ort

    h = harness
    onnx, _ = matmul_onnx(4096, 4096)  # 64 MiB of weights
    converted = to_ort(onnx, verify=False)
    n = len(converted)
    assert n > 64 * MiB
    x = np.ones((1, 4096), np.float32)
    h.publish("big-ort", 1, converted)
    h.publish("big-onnx", 1, onnx)
    h.grant("big-ort", USER)
    h.grant("big-onnx", USER)
    del converted

    traced, rss = _load_peaks(h, "big-ort", x)
    # Python allocated the one buffer (sized from the sealed file) and chunk-sized pieces only
    assert n <= traced < n + 8 * MiB, traced / n
    if rss is not None:  # ONNX Runtime added no copy of its own (no prepacked copy either)
        assert rss < 1.2 * n + 16 * MiB, rss / n
    assert cached(h, "big-ort", 1).zero_copy

    # the control: the same weights as ONNX take a bytes copy for the Python binding and ONNX
    # Runtime's own parsed copy, which these measurements see
    traced_onnx, rss_onnx = _load_peaks(h, "big-onnx", x)
    assert traced_onnx >= 2 * len(onnx) * 0.99, traced_onnx / len(onnx)
    if rss_onnx is not None:
        assert rss_onnx > 1.8 * len(onnx), rss_onnx / len(onnx)


# -- no re-optimisation --------------------------------------------------------------------------


def _profiled_ops(path: str) -> list[str]:
    events = json.loads(Path(path).read_text())
    ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return sorted(ops)


def _python_profile(data: bytes, tmp: Path, level: ort.GraphOptimizationLevel, x: np.ndarray, **config: str) -> list:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / f"py-{level.name}")
    for k, v in config.items():
        options.add_session_config_entry(k, v)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    session.run(None, {"input": x})
    return _profiled_ops(session.end_profiling())


def test_the_runtime_session_runs_the_file_as_optimised_offline(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.ort_format import to_ort

    h = harness
    onnx = cnn_onnx()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    basic = to_ort(onnx, level="basic")  # BatchNorm folded into the Conv; Relu kept apart

    # ONNX Runtime's own profiler on the runtime's session: enable it on the options the
    # runtime builds (through the same C API table), then end it on the cached session
    a = ort_native.api()
    base = a._lib.OrtGetApiBase().contents
    table = ctypes.cast(base.GetApi(ort_native.API_VERSION), ctypes.POINTER(ctypes.c_void_p))
    enable_profiling = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(table[14])
    end_profiling = ctypes.CFUNCTYPE(
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    )(table[110])
    create = a.CreateSessionFromArray

    def profiled_create(env: Any, data: Any, size: Any, options: Any, out: Any) -> Any:
        a.check(enable_profiling(options, str(tmp_path / "runtime").encode()))
        return create(env, data, size, options, out)

    monkeypatch.setattr(a, "CreateSessionFromArray", profiled_create)
    h.publish("cnn", 1, basic)
    h.grant("cnn", USER)
    assert_close(h.infer("cnn", USER, {"input": x}), reference(onnx, x))
    monkeypatch.undo()
    session = cached(h, "cnn", 1).session
    raw = ctypes.c_void_p()
    a.check(end_profiling(session._session, a.allocator, ctypes.byref(raw)))
    runtime_ops = _profiled_ops(a.take_string(raw))

    # exactly the converted file's nodes: nothing fused or folded at load
    assert runtime_ops == ["Conv", "Flatten", "Gemm", "GlobalAveragePool", "Relu"]
    assert session.graph_optimization_level == ort_native.ORT_DISABLE_ALL
    assert session.config == ort_native.ORT_FORMAT_CONFIG
    # the controls: optimising this graph at load would fuse Conv and Relu (the ONNX original
    # at ONNX Runtime's default level), and the original has the BatchNorm the conversion folded
    every = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert "Relu" not in _python_profile(onnx, tmp_path, every, x)
    assert "BatchNormalization" in _python_profile(onnx, tmp_path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, x)
    # and ONNX Runtime never re-optimises an ORT-format model, whatever the level asked
    assert _python_profile(basic, tmp_path, every, x, **{"session.load_model_format": "ORT"}) == runtime_ops


def test_an_ort_model_the_c_api_path_cannot_take_falls_back_without_reoptimising(harness: Harness) -> None:
    """scikit-learn's ZipMap output is a sequence of maps: the Python binding serves it, with
    graph optimisation off (its session options say so), answering as the ONNX original."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    from veil.ort_format import to_ort

    h = harness
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    lr = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    onnx = to_onnx(lr, initial_types=[("input", FloatTensorType([None, 4]))], target_opset=17).SerializeToString()
    h.publish("zip-onnx", 1, onnx)
    h.publish("zip-ort", 1, to_ort(onnx))
    h.grant("zip-onnx", USER)
    h.grant("zip-ort", USER)
    assert_close(h.infer("zip-ort", USER, {"input": x[:6]}), h.infer("zip-onnx", USER, {"input": x[:6]}))
    loaded = cached(h, "zip-ort", 1)
    assert isinstance(loaded, OnnxModel) and loaded.format == "ort" and not loaded.zero_copy
    level = loaded.session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


# -- timings and failures ------------------------------------------------------------------------


def test_cold_request_timings_split_session_creation_from_the_first_run(
    harness: Harness, trained: TrainedModels
) -> None:
    from veil.ort_format import to_ort

    h = harness
    h.publish("lr", 1, to_ort(trained.v1))
    h.grant("lr", USER)
    _, cold = timed(h, "lr", trained.x)
    for k in ("key_release_ms", "model_fetch_decrypt_ms", "session_create_ms", "first_run_ms", "infer_ms"):
        assert isinstance(cold[k], float) and cold[k] >= 0, k
    assert cold["model_zero_copy"] is True and cold["model_cached"] is False
    assert cold["first_run_ms"] == cold["infer_ms"]
    _, warm = timed(h, "lr", trained.x)
    assert warm["model_cached"] is True and "first_run_ms" not in warm and "session_create_ms" not in warm
    # a plain ONNX model reports the same split, without the zero-copy flag set
    h.publish("plain", 1, trained.v1)
    h.grant("plain", USER)
    _, plain = timed(h, "plain", trained.x)
    assert plain["model_zero_copy"] is False and "first_run_ms" in plain and "session_create_ms" in plain


def test_tampered_or_broken_ort_models_leave_no_cache_entry(harness: Harness, trained: TrainedModels) -> None:
    from veil.ort_format import to_ort

    h = harness
    converted = to_ort(trained.v1)
    h.grant("lr", USER)
    # tampered in the store: one byte of the sealed file
    h.publish("lr", 1, converted)
    path = h.store.path("lr", 1)
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 0x40
    path.write_bytes(bytes(sealed))
    code, _, status = refused(h, h.request("lr", USER, {"input": trained.x}))
    assert (code, status) == ("model_integrity", 403)
    assert h.core.stats()["models_cached"] == [] and h.core.stats()["model_cache_bytes"] == 0
    # authentic but not a loadable ORT model (the owner sealed a broken file)
    h.publish("lr", 2, converted[: len(converted) // 2])
    h.clock.advance(61)  # past the cached release's lifetime: the next request asks for version 2
    code, _, _ = refused(h, h.request("lr", USER, {"input": trained.x}))
    assert code == "bad_model"
    assert h.core.stats()["models_cached"] == []
    # the next good version serves
    h.publish("lr", 3, converted)
    h.clock.advance(61)
    assert_close(h.infer("lr", USER, {"input": trained.x}), reference(trained.v1, trained.x))
    assert h.core.stats()["model_versions_cached"] == [["lr", 3]]


# -- the converter --------------------------------------------------------------------------------


def test_the_converter_checks_its_input_and_stays_out_of_the_runtime(trained: TrainedModels) -> None:
    from veil.attest.measurement import closure
    from veil.errors import BadRequest
    from veil.ort_format import to_ort

    converted = to_ort(trained.v1)
    with pytest.raises(BadRequest, match="already in ORT format"):
        to_ort(converted)
    with pytest.raises(BadRequest, match="one of basic, extended, all"):
        to_ort(trained.v1, level="layout-for-this-cpu")
    with pytest.raises(BadRequest) as exc:
        to_ort(b"not a model")
    assert exc.value.code == "bad_model"
    modules = closure("runtime").modules
    assert "veil.runtime.ort_native" in modules and "veil.runtime.backend" in modules
    assert "veil.ort_format" not in modules


def test_publish_optimize_end_to_end(tmp_path: Path, trained: TrainedModels) -> None:
    """`ModelOwner.publish(optimize=True)` on a real local deployment: the sealed model is ORT
    format (the runtime reads it in place), the card is the original graph's signature."""
    from veil import onnx_signature
    from veil.deployment import LocalDeployment, StackOptions
    from veil.sdk import ModelOwner, ModelUser

    deployment = LocalDeployment(tmp_path / "stack", StackOptions(he=False, packer_policy=None))
    info = deployment.start()
    owner = user = None
    try:
        trust = deployment.local_trust_anchors()
        owner, user = ModelOwner(info, trust=trust), ModelUser(info, trust=trust)
        owner.register()
        user.register()
        result = owner.publish("lr-fast", trained.v1, optimize=True)
        assert result["plaintext_bytes"] != len(trained.v1)
        owner.grant("lr-fast", user.id)
        user.request_access("lr-fast")
        got = user.infer("lr-fast", trained.x, timings=True)
        assert user.last_timings["model_zero_copy"] is True
        assert_close(got, reference(trained.v1, trained.x))
        card = user.card("lr-fast")
        assert (card.inputs, card.outputs) == onnx_signature.signature(trained.v1)
    finally:
        for p in (owner, user):
            if p is not None:
                p.close()
        deployment.stop()
