"""The runtime benchmark's plaintext baseline: an inference server with no Veil security at all.

`veil bench runtime` compares Veil's runtime against this server, deployed as a second function
on the same local platform and reached through the same gateway hop, so both paths cross the
same client, gateway, platform and action-server code and differ only in what the instance does
with a request. It lives under bench/ because plaintext has no place in the measured runtime:
it gets no keys from any KeyService and reads the plaintext ONNX file from a path given at
`/init`.

It speaks the OpenWhisk action protocol with Veil's own action server (`POST /init`, `POST
/run`, same bounded thread pool, framing and sentinels) and loads the model with Veil's ONNX
backend (`veil.runtime.backend.OnnxModel`: the same session options and input checks), so the
comparison isolates the cost of the envelopes, key release and attestation.

Init value: {"model_path": str, optional "intra_op_threads": int (default 1),
"copies_per_thread": bool (default false)}. With `copies_per_thread` every request thread builds
its own copy of the model, as SeSeMI's runtime does: the memory benchmark's baseline.
Run value: {"tensors": base64url of the tensor codec} -> {"tensors": ..., "timings": {...}};
{"op": "stats"} -> the number of model copies. A `/run` whose body is binary (the action
server's binary form, `veil.wire.run`) carries the raw tensor codec instead, no envelope and no
base64, and is answered with the raw output codec the same way: the raw-transport baseline.

    VEIL_PORT=8080 python bench/plain_server.py
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from veil.crypto.encoding import b64d, b64e
from veil.errors import BadRequest
from veil.runtime import tensors
from veil.runtime.action_server import ActionServer, ActionState, make_handler
from veil.runtime.backend import OnnxModel

log = logging.getLogger("bench.plain_server")


class PlainAction:
    """Plaintext tensors in, plaintext tensors out, through one shared ONNX Runtime session or,
    SeSeMI-style, one copy of the model per request thread."""

    def __init__(self, init: dict[str, Any]) -> None:
        path = init.get("model_path")
        if not isinstance(path, str):
            raise BadRequest("init.model_path: required string (the plaintext ONNX file)", code="bad_init")
        threads = init.get("intra_op_threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 64:
            raise BadRequest("init.intra_op_threads: an integer in [0, 64]", code="bad_init")
        self.model_bytes = Path(path).read_bytes()
        self.intra_op_threads = threads
        self.copies_per_thread = bool(init.get("copies_per_thread", False))
        self.shared = OnnxModel(self.model_bytes, intra_op_threads=threads)
        self._local = threading.local()
        self._copies = 0
        self._lock = threading.Lock()

    def _model(self) -> OnnxModel:
        if not self.copies_per_thread:
            return self.shared
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = OnnxModel(self.model_bytes, intra_op_threads=self.intra_op_threads)
            with self._lock:
                self._copies += 1
        return model

    def describe(self) -> dict[str, Any]:
        return {"kind": "plain", "copies_per_thread": self.copies_per_thread, "model_bytes": len(self.model_bytes)}

    def run(self, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("op") == "stats":
            return {"copies_per_thread": self.copies_per_thread, "model_copies": self._copies}
        raw = value.get("envelope")
        if isinstance(raw, bytes):  # the binary body: raw tensors in, raw tensors out
            return {"envelope": tensors.encode(self._model().run(tensors.decode(raw)))}
        if "tensors" not in value:
            raise BadRequest("value: expected 'tensors' (or op 'stats')", code="malformed")
        t0 = time.perf_counter()
        inputs = tensors.decode(b64d(value["tensors"], "tensors"))
        t1 = time.perf_counter()
        outputs = self._model().run(inputs)
        t2 = time.perf_counter()
        encoded = b64e(tensors.encode(outputs))
        t3 = time.perf_counter()
        timings = {"decode_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3, "encode_ms": (t3 - t2) * 1e3}
        return {"tensors": encoded, "timings": timings}


class PlainState(ActionState):
    """The action server's state, building a `PlainAction` at /init (whatever `kind` says)."""

    def build(self, value: dict[str, Any], settings: Mapping[str, str] | None = None) -> dict[str, Any]:
        self.action = PlainAction(value)
        return self.action.describe()


def main() -> None:
    """Serve on VEIL_PORT (loopback unless VEIL_HOST says otherwise) until interrupted."""
    logging.basicConfig(
        level=os.environ.get("VEIL_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = os.environ.get("VEIL_HOST", "127.0.0.1")
    port = int(os.environ.get("VEIL_PORT", "8080"))
    threads = int(os.environ.get("VEIL_THREADS", "4"))
    queue = int(os.environ.get("VEIL_QUEUE", "32"))
    server = ActionServer((host, port), make_handler(PlainState(threads, queue)))
    # the same line the runtime logs, which `veil bench runtime` reads for its cold-start breakdown
    log.info("action server on %s:%d (%d threads, queue %d)", host, port, threads, queue)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
