"""One JSON object per line over a stream socket: the fork template's protocol.

The platform's side (`veil.platform.template`) asks the runtime's fork server
(`veil.runtime.template`) for an instance with one line and reads one line back; both ends
frame and parse the same way here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import socket
from typing import Any


def send_json_line(conn: socket.socket, message: Any) -> None:
    """Send `message` as one line of JSON (OSError if the peer has gone)."""
    conn.sendall(json.dumps(message).encode() + b"\n")


def read_json_line(conn: socket.socket, limit: int) -> tuple[Any, bytes]:
    """(the first line's JSON, the bytes received after it). An empty line or a peer that
    closed without one reads as `{}`; ValueError past `limit` bytes or for a line that is not
    JSON, OSError (a timeout included) from the socket."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"message exceeds {limit} bytes")
    line, _, rest = data.partition(b"\n")
    return json.loads(line or b"{}"), rest
