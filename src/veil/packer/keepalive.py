"""Per-model keep-alive learned from inter-arrival times.

After the hybrid histogram policy of Shahrad et al., "Serverless in the Wild" (ATC '20): keep a
histogram of each model's idle times; when it is representative (enough samples and bin counts
concentrated, i.e. a high coefficient of variation across bins), keep the model warm until the
99th percentile of its idle times plus a margin; otherwise fall back to the platform's fixed
keep-alive. A model called every second then stays warm ~1 s instead of a fixed minute, and a
model whose gaps are long and erratic keeps the conservative default.

The paper also pre-warms at the 5th percentile and switches to ARIMA for out-of-range gaps; this
module reports the head percentile (`prewarm_s`) but Veil's packer does not pre-warm yet.
Bins are in seconds of whatever time scale the caller uses (a compressed trace compresses them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """A model's learned windows; `representative` False means the default was used."""

    keepalive_s: float
    prewarm_s: float
    representative: bool


class IdleHistogram:
    """Fixed-width histogram of idle times with an out-of-bounds counter.

    The sum and the sum of squares of the bin counts are kept as counts change, so `bin_cv`
    (asked on every request the packer routes) costs nothing per bin; summing 240 bins twice
    per request was a measurable part of the packer's time on each HE request."""

    def __init__(self, bin_s: float, bins: int) -> None:
        if bin_s <= 0 or bins < 2:
            raise ValueError("bin_s must be > 0 and bins >= 2")
        self.bin_s = bin_s
        self.counts = [0] * bins
        self.oob = 0
        self.total = 0
        self._in_range = 0  # sum(counts)
        self._squares = 0  # sum(c * c for c in counts)

    def observe(self, idle_s: float) -> None:
        self.total += 1
        idx = int(max(0.0, idle_s) / self.bin_s)
        if idx >= len(self.counts):
            self.oob += 1
        else:
            count = self.counts[idx]
            self.counts[idx] = count + 1
            self._in_range += 1
            self._squares += 2 * count + 1  # (c + 1)^2 - c^2

    def percentile(self, pct: float) -> float:
        """Upper edge of the bin holding the pct-th percentile; inf if it lies out of range."""
        if self.total <= 0:
            return math.inf
        target = pct / 100.0 * self.total
        seen = 0
        for idx, count in enumerate(self.counts):
            seen += count
            if seen >= target and count:
                return (idx + 1) * self.bin_s
        return math.inf

    def bin_cv(self) -> float:
        """Coefficient of variation of the bin counts (high = concentrated = predictable)."""
        n, total = len(self.counts), self._in_range
        if total == 0:
            return 0.0
        # sqrt(var) / mean with var = squares/n - mean^2, mean = total/n: exact in integers
        return math.sqrt(n * self._squares - total * total) / total


class KeepAliveLearner:
    """Learns one keep-alive window per model from the gaps between its arrivals."""

    def __init__(
        self,
        default_s: float,
        *,
        bin_s: float = 0.5,
        bins: int = 240,
        min_samples: int = 8,
        cv_threshold: float = 2.0,
        max_oob_fraction: float = 0.5,
        head_pct: float = 5.0,
        tail_pct: float = 99.0,
        margin: float = 0.10,
        min_s: float = 1.0,
        max_s: float | None = None,
    ) -> None:
        self.default_s = default_s
        self.bin_s = bin_s
        self.bins = bins
        self.min_samples = min_samples
        self.cv_threshold = cv_threshold
        self.max_oob_fraction = max_oob_fraction
        self.head_pct = head_pct
        self.tail_pct = tail_pct
        self.margin = margin
        self.min_s = min_s
        self.max_s = default_s if max_s is None else max_s
        self._hist: dict[str, IdleHistogram] = {}
        self._last: dict[str, float] = {}
        self._cache: dict[str, Window] = {}

    def observe(self, model: str, now: float) -> None:
        """Record an arrival of `model` at `now`."""
        last = self._last.get(model)
        self._last[model] = now
        if last is None:
            return
        hist = self._hist.get(model)
        if hist is None:
            hist = self._hist[model] = IdleHistogram(self.bin_s, self.bins)
        hist.observe(now - last)
        self._cache.pop(model, None)

    def window(self, model: str) -> Window:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        win = self._compute(model)
        self._cache[model] = win
        return win

    def keepalive(self, model: str) -> float:
        return self.window(model).keepalive_s

    def _compute(self, model: str) -> Window:
        hist = self._hist.get(model)
        fallback = Window(self.default_s, 0.0, False)
        if hist is None or hist.total < self.min_samples:
            return fallback
        if hist.oob > self.max_oob_fraction * hist.total:
            return fallback
        if hist.bin_cv() < self.cv_threshold:
            return fallback
        tail = hist.percentile(self.tail_pct) * (1 + self.margin)
        head = hist.percentile(self.head_pct) * (1 - self.margin)
        keep = min(self.max_s, max(self.min_s, tail))
        return Window(keep, max(0.0, head), True)
