"""`python -m veil.runtime`: one runtime instance (OpenWhisk action server) on VEIL_PORT.

Environment: VEIL_PORT (8080), VEIL_HOST (loopback unless running under an OpenWhisk invoker;
the container image sets 0.0.0.0), VEIL_THREADS, VEIL_QUEUE, VEIL_INIT (an init value as JSON,
built before the port opens: Knative has no /init call), VEIL_ERROR_STATUS (`body`, the default:
/run errors answer 200 with the status inside, as OpenWhisk needs; `http`: also as the HTTP
status), VEIL_SIM_ROOT (the simulation root file, when simulating a TEE), VEIL_LOG_LEVEL.
With VEIL_FORK_SERVER (a Unix socket path) set, the process is instead the platform's fork
template (`veil.runtime.template`): it imports the runtime once and forks instances that serve.
"""

from __future__ import annotations

import logging
import os
import sys

from veil.runtime.action_server import (
    ERROR_STATUS_ENV,
    INIT_ENV,
    describe_failure,
    parse_init,
    prewarm_imports,
    serve,
)
from veil.runtime.template import FORK_SERVER_ENV, serve_template


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("VEIL_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    template = os.environ.get(FORK_SERVER_ENV)
    if template:
        serve_template(template)
        return
    host = os.environ.get(
        "VEIL_HOST", "0.0.0.0" if os.environ.get("__OW_API_HOST") not in (None, "local") else "127.0.0.1"
    )
    error_status = os.environ.get(ERROR_STATUS_ENV, "body")
    if error_status not in ("body", "http"):
        print(f"Error: {ERROR_STATUS_ENV}={error_status!r}: must be 'body' or 'http'", file=sys.stderr)
        sys.exit(2)
    init = os.environ.get(INIT_ENV)
    if os.environ.get("VEIL_PREWARM", "1") == "1" and init is None:
        prewarm_imports()
    try:
        serve(
            int(os.environ.get("VEIL_PORT", "8080")),
            init=parse_init(init) if init else None,
            threads=int(os.environ.get("VEIL_THREADS", "4")),
            queue=int(os.environ.get("VEIL_QUEUE", "32")),
            host=host,
            http_error_status=error_status == "http",
        )
    except Exception as exc:  # noqa: BLE001 - a failed start is one clear line, not a traceback
        print(
            f"Error: cannot start the runtime ({INIT_ENV} set: {init is not None}): {describe_failure(exc)}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
