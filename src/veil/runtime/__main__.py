"""`python -m veil.runtime`: one runtime instance (OpenWhisk action server) on VEIL_PORT."""

from __future__ import annotations

import json
import logging
import os

from veil.runtime.action_server import prewarm_imports, serve


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("VEIL_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = os.environ.get(
        "VEIL_HOST", "0.0.0.0" if os.environ.get("__OW_API_HOST") not in (None, "local") else "127.0.0.1"
    )
    init = os.environ.get("VEIL_INIT")
    if os.environ.get("VEIL_PREWARM", "1") == "1" and init is None:
        prewarm_imports()
    serve(
        int(os.environ.get("VEIL_PORT", "8080")),
        init=json.loads(init) if init else None,
        threads=int(os.environ.get("VEIL_THREADS", "4")),
        queue=int(os.environ.get("VEIL_QUEUE", "32")),
        host=host,
    )


if __name__ == "__main__":
    main()
