"""A small real OpenWhisk-protocol action for platform tests (stdlib only, starts in ~50 ms).

Listens on 127.0.0.1:$VEIL_PORT. POST /init {"value": init} once (a second /init is refused
like OpenWhisk's action proxy does); init may ask for {"init_sleep": s} or {"init_fail": true}.
POST /run {"value": v, ...} echoes; v may ask for:
  {"sleep": s}            sleep s seconds first
  {"crash": true}         os._exit(3) mid-request (connection reset, no answer)
  {"crash_once": path}    crash only if `path` does not exist yet (creates it first)
  {"fail": true}          answer 400 {"error": {"code": "bad_input", "message": ...}}
  {"spam": n}             write n bytes to stdout and to stderr first
  {"alloc_mb": n}         allocate and touch n MiB (held for the request), to go over a limit
  {"model": m, "load_s": s}  sleep s seconds the first time this process sees model m (a load)
The answer reports the pid, the init value, the activation fields and the __OW_* environment.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE: dict = {"init": None, "runs": 0, "models": set()}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def log_message(self, format: str, *args: object) -> None:  # keep test logs quiet
        pass

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/init":
            with LOCK:
                if STATE["init"] is not None:
                    return self._answer(403, {"error": "cannot initialize the action more than once"})
                value = body.get("value", {})
                STATE["init"] = value
            if value.get("init_sleep"):
                time.sleep(float(value["init_sleep"]))
            if value.get("init_fail"):
                return self._answer(502, {"error": {"code": "init_failed", "message": "asked to fail"}})
            return self._answer(200, {"ok": True})
        if self.path == "/run":
            if STATE["init"] is None:
                return self._answer(500, {"error": "action not initialized"})
            value = body.get("value", {})
            with LOCK:
                STATE["runs"] += 1
            if value.get("spam"):
                chunk = b"x" * 1024 + b"\n"
                for _ in range(int(value["spam"]) // len(chunk)):
                    sys.stdout.buffer.write(chunk)
                    sys.stderr.buffer.write(chunk)
                sys.stdout.flush()
                sys.stderr.flush()
            if value.get("load_s") and value.get("model") not in STATE["models"]:
                STATE["models"].add(value.get("model"))
                time.sleep(float(value["load_s"]))
            held = bytearray()
            if value.get("alloc_mb"):
                held = bytearray(int(value["alloc_mb"]) << 20)
                for i in range(0, len(held), 4096):  # touch every page: resident, not just reserved
                    held[i] = 1
                time.sleep(0.5)  # hold it long enough for a watchdog's sample
            if value.get("sleep"):
                time.sleep(float(value["sleep"]))
            marker = value.get("crash_once")
            if marker and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(3)
            if value.get("crash"):
                os._exit(3)
            if value.get("fail"):
                return self._answer(400, {"error": {"code": "bad_input", "message": "asked to fail"}})
            return self._answer(
                200,
                {
                    "echo": value,
                    "pid": os.getpid(),
                    "init": STATE["init"],
                    "runs": STATE["runs"],
                    "held_mb": len(held) >> 20,
                    "activation": {k: v for k, v in body.items() if k != "value"},
                    "env": {k: v for k, v in os.environ.items() if k.startswith(("__OW_", "VEIL_"))},
                },
            )
        return self._answer(404, {"error": f"no route {self.path}"})


def main() -> None:
    port = int(os.environ.get("VEIL_PORT", "8080"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
