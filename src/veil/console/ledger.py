"""The console's own record of what it did, kept in the principal's client directory.

Why: the KeyService answers "who owns this model and which version is current", but has no
call listing an owner's grants, and its audit log is readable only on its own machine. So each
action the console takes (publish, grant, revoke, request access, a model added by id) is
appended here once the SDK has verified the KeyService's signed answer, and the console can show
grants and revocations for any deployment, local or not. One JSON object a line, file mode 0600.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

FILE_NAME = "console-log.jsonl"
MAX_ENTRIES_READ = 10_000


class Ledger:
    """Append-only JSON lines at `client_dir/console-log.jsonl`."""

    def __init__(self, client_dir: Path) -> None:
        self.path = Path(client_dir) / FILE_NAME
        self._lock = threading.Lock()

    def append(self, action: str, **fields: Any) -> dict[str, Any]:
        """Record one verified action (`ts` is Unix seconds, as in the KeyService's audit log)."""
        entry = {"ts": round(time.time(), 3), "action": action, **fields}
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry, oldest first; a torn last line (a crash mid-write) is skipped."""
        if not self.path.exists():
            return []
        out = []
        with self._lock:
            lines = self.path.read_text().splitlines()[-MAX_ENTRIES_READ:]
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("action"), str):
                out.append(entry)
        return out
