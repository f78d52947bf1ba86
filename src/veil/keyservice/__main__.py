"""`python -m veil.keyservice`: the KeyService process, with nothing in it but measured code.

`veil keyservice serve` (the CLI) replaces itself with this program, so the click-based CLI never
runs inside the KeyService; the measurement of the KeyService covers exactly what this process
imports (argparse and the rest of the standard library aside).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m veil.keyservice", description="Serve the Veil KeyService.")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--allow-simulated", action="store_true")
    parser.add_argument("--durability", choices=("normal", "full"), default="normal")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from veil.keyservice.server import build_keyservice, serve

    try:
        ks = build_keyservice(args.state_dir, allow_simulated=args.allow_simulated, durability=args.durability)
    except Exception as exc:  # noqa: BLE001 - startup failures are reported in one line, not traced
        print(f"Error: cannot start the KeyService: {exc}", file=sys.stderr)
        return 1
    print(
        f"KeyService listening on http://{args.host}:{args.port} "
        f"(state {args.state_dir}, attested by {ks.provider.describe()})",
        file=sys.stderr,
        flush=True,
    )
    serve(ks, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
