"""A model-serving action for the packer benchmark, speaking the OpenWhisk action protocol.

Run as a platform instance: `python model_action.py` (port from VEIL_PORT). `POST /init` with
`{"value": {"model_dir": DIR}}`; `POST /run` with `{"value": {"model": ID, "x": [[...64 floats]]}}`
loads `DIR/ID.onnx` into an ONNX Runtime session on first use (a real cold model load, in time
and memory) and runs it; `{"value": {"op": "unload", "model": ID}}` drops the session. Concurrent
first requests for one model wait for a single load. Each answer reports `cold`, `load_ms`,
`exec_ms` and the process's `rss_mb`, so memory accounting can be checked against the packer's.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort

_state: dict = {"model_dir": None}
_sessions: dict[str, ort.InferenceSession] = {}
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _session(model: str) -> tuple[ort.InferenceSession, bool, float]:
    with _guard:
        lock = _locks.setdefault(model, threading.Lock())
        sess = _sessions.get(model)
    if sess is not None:
        return sess, False, 0.0
    with lock:
        sess = _sessions.get(model)
        if sess is not None:
            return sess, True, 0.0  # waited on another request's load
        path = Path(_state["model_dir"]) / f"{model}.onnx"
        if not path.is_file():
            raise LookupError(f"unknown model {model!r}")
        t0 = time.perf_counter()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        with _guard:
            _sessions[model] = sess
        return sess, True, (time.perf_counter() - t0) * 1000


def _run(value: dict) -> dict:
    model = str(value.get("model", ""))
    if value.get("op") == "unload":
        with _guard:
            dropped = _sessions.pop(model, None) is not None
        gc.collect()
        return {"unloaded": dropped, "rss_mb": round(_rss_mb(), 1)}
    t0 = time.perf_counter()
    sess, cold, load_ms = _session(model)
    x = np.asarray(value.get("x") or [[0.0] * 64], dtype=np.float32)
    t1 = time.perf_counter()
    y = sess.run(None, {"x": x})[0]
    t2 = time.perf_counter()
    return {
        "y": y.round(5).tolist(),
        "cold": cold,
        "load_ms": round(load_ms, 3),
        "exec_ms": round((t2 - t1) * 1000, 3),
        "total_ms": round((t2 - t0) * 1000, 3),
        "rss_mb": round(_rss_mb(), 1),
        "models": len(_sessions),
    }


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet: the platform keeps instance logs
        return

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            value = json.loads(self.rfile.read(length) or b"{}").get("value", {})
        except ValueError:
            self._answer(400, {"error": {"code": "bad_request", "message": "body is not JSON"}})
            return
        if self.path == "/init":
            _state["model_dir"] = value.get("model_dir")
            self._answer(200, {"ok": True})
        elif self.path == "/run":
            try:
                self._answer(200, _run(value))
            except LookupError as exc:
                self._answer(404, {"error": {"code": "unknown_model", "message": str(exc)}})
            except Exception as exc:  # an action error, reported, never a crash
                self._answer(500, {"error": {"code": "action_failed", "message": type(exc).__name__}})
        else:
            self._answer(404, {"error": {"code": "not_found", "message": self.path}})


def main() -> None:
    port = int(os.environ.get("VEIL_PORT", "8080"))
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
