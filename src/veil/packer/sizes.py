"""Each model's resident size, as the packer plans with it: measured where it can be, else
estimated from the sealed file, never a flat guess for everyone.

A packer that assumes every model is 40 MB puts three 400 MB models on one instance, which then
swaps them in and out on every request (or, with memory enforced, is stopped). So:

- the **sealed size** comes from the model store (the newest version's file; AES-GCM adds a few
  bytes per chunk, so it is the plaintext's size to within a fraction of a percent);
- the **measured resident size** is what the instance's resident set grew by while it loaded
  the model and answered its first request (session, arenas, the decrypted buffer), or its
  high-water mark when the load peaked above anything before, read by the platform from the
  process after that request; a measured model is still planned at no less than its sealed size
  times `prior_ratio` (a load needs its sealed bytes and more for a moment);
- a model not measured yet is planned at its sealed size times the largest resident/sealed
  ratio measured so far on models of at least 16 MB (at first `prior_ratio`, 1.3: what the
  runtime's load path is held to, issue 15; at most 4), since loading costs more than the bytes.

Thread-safe. Sealed sizes are looked up outside any scheduling lock (the store may be remote)
and remembered for `refresh_s`, so a republished model's new size is seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("veil.packer.sizes")
MB = float(1 << 20)
RATIO_MIN_MB = 16.0  # models from which the resident/sealed ratio is learned
MAX_RATIO = 4.0


def store_sealed_mb(location: str) -> Callable[[str], float | None]:
    """Sealed size (MB) of a model's newest version in the store at `location` (a directory or
    a store service's URL), None when the store has no such model or cannot be read."""
    store: Any = None

    def sealed(model: str) -> float | None:
        nonlocal store
        try:
            if store is None:
                from veil.store.client import open_store

                store = open_store(location)
            versions = store.versions(model)
            if not versions:
                return None
            return store.stat(model, max(versions)).size / MB
        except Exception as e:  # noqa: BLE001 - a size lookup must never fail a request
            log.debug("sealed size of %r unavailable: %s", model, e)
            return None

    return sealed


class ModelSizes:
    """Planned resident size (MB) per model; see the module docstring."""

    def __init__(
        self,
        sealed_mb: Callable[[str], float | None] | None,
        *,
        prior_ratio: float = 1.3,
        refresh_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sealed_mb = sealed_mb
        self.ratio = self.prior_ratio = prior_ratio
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sealed: dict[str, tuple[float | None, float]] = {}  # model -> (MB, looked up at)
        self._measured: dict[str, float] = {}

    def lookup(self, model: str) -> float | None:
        """The planned size of `model`, looking its sealed size up if it is not fresh."""
        with self._lock:
            cached = self._sealed.get(model)
            fresh = cached is not None and self._clock() - cached[1] < self._refresh_s
        if not fresh and self._sealed_mb is not None:
            size = self._sealed_mb(model)
            with self._lock:
                self._sealed[model] = (size, self._clock())
        return self.planned(model)

    def planned(self, model: str) -> float | None:
        with self._lock:
            measured = self._measured.get(model)
            sealed = self._sealed.get(model, (None, 0.0))[0]
            if measured is not None:  # never below what loading needs at first (prior x sealed)
                return round(max(measured, (sealed or 0.0) * self.prior_ratio), 1)
            return None if sealed is None else round(sealed * self.ratio, 1)

    def measured(self, model: str, resident_mb: float) -> None:
        """The resident set grew by `resident_mb` while `model` loaded (and ran once)."""
        if resident_mb <= 0:
            return
        with self._lock:
            self._measured[model] = max(resident_mb, self._measured.get(model, 0.0) * 0.5)
            sealed = self._sealed.get(model, (None, 0.0))[0]
            # small models say little about large ones (a runtime's arenas dwarf a 1 MB model)
            if sealed and sealed >= RATIO_MIN_MB:
                self.ratio = min(MAX_RATIO, max(self.ratio, resident_mb / sealed))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ratio": round(self.ratio, 3),
                "sealed_mb": {m: None if s is None else round(s, 1) for m, (s, _) in self._sealed.items()},
                "measured_mb": {m: round(v, 1) for m, v in self._measured.items()},
            }
