"""Compile-time guarantees: every value a ciphertext or plaintext holds fits its modulus.

CKKS computes modulo Q_l (the product of the primes left at level l). A value v at scale s is
correct only while |v| * s < Q_l / 2; past that it wraps silently and decrypts to garbage, and
SEAL refuses outright to *encode* a plaintext whose coefficients need as many bits as Q_l has
("encoded values are too large", which is how the Wine LR failed at request time). So the
compiler bounds, over the owner's calibration data times a safety margin, every intermediate a
program can produce:

- the weights and biases it encodes (at the weight scale, and the product scale);
- every partial sum of every mat-vec, whatever order a program sums in (rotate-and-sum, baby
  steps, coefficient products, throughput's weighted sums): each is bounded by
  sum_j |W_ij h_j| + |b_i|, the *absolute* pre-activation, which can be far larger than the
  output when large terms cancel (Wine: a bias of 20.8 cancels a weighted sum of -20);
- every output and every square.

`analyse` computes those bounds (and sets `FusedPlan.ranges`, which the parameter selector sizes
the primes from); `verify` walks the exact modulus chain SEAL builds and the scale schedule the
server will use, for latency and throughput, and refuses (PlanError) naming the layer, the value
and the bits it would need, so nothing the compiler accepts can fail or wrap at request time.
`measure_error` runs the compiled model on real SEAL ciphertexts (dev side, at compile time) so
the precision the manifest states is a measured one.

Dev-side only: the server never imports this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from veil.he.errors import PlanError
from veil.he.plan import FusedPlan

# SEAL refuses to encode when ceil(log2(max |coeff| * scale)) + 1 >= log2(Q_l): plaintexts need two
# bits below log2(Q_l). A ciphertext value must stay below Q_l / 2 to decrypt: one bit.
PLAIN_HEADROOM_BITS = 2.0
CIPHER_HEADROOM_BITS = 1.0


@dataclass(frozen=True)
class LayerBound:
    """Calibrated magnitudes of one fused layer (already multiplied by the margin)."""

    index: int
    shape: tuple[int, int]
    input: float  # max |h| entering the layer
    partial: float  # max_i sum_j |W_ij h_j| + |b_i|: bounds every partial sum and the bias
    output: float  # max |W h + b|
    square: float  # max (W h + b)**2 (0 when the layer has no square)
    weight: float  # max |W_ij|
    bias: float  # max |b_i|

    @property
    def peak(self) -> float:
        """The range the primes must hold: the largest ciphertext value of this layer, and the
        bias as a plaintext (a complex constant in throughput, |b| sqrt 2, with SEAL's extra bit)."""
        return max(self.partial, self.output, self.square, 2.0 * math.sqrt(2.0) * self.bias)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def analyse(plan: FusedPlan, x: np.ndarray, margin: float = 2.0) -> list[LayerBound]:
    """Bound every intermediate of `plan` on calibration inputs `x` (normalised), times `margin`.

    Also records the peaks in `plan.ranges` / `plan.input_range`, which `params.select_params`
    reads. The guarantee is: every request whose intermediates stay within `margin` times their
    calibrated maxima runs correctly. The server cannot see values, so it cannot refuse an
    input outside that envelope; the owner's calibration data must be representative.
    """
    h = np.asarray(x, dtype=np.float64)
    if h.ndim != 2 or not np.all(np.isfinite(h)):
        raise PlanError("calibration data must be a finite 2-D array")
    bounds: list[LayerBound] = []
    plan.input_range = max(float(np.max(np.abs(h))), 1e-12) * margin
    for i, layer in enumerate(plan.layers):
        w, b = layer.affine.weight, layer.affine.bias
        partial = float(np.max(np.abs(h) @ np.abs(w).T + np.abs(b)))
        y = layer.affine.apply(h)
        out = float(np.max(np.abs(y)))
        sq = out * out if layer.square else 0.0
        bounds.append(
            LayerBound(
                index=i,
                shape=(layer.affine.out_dim, layer.affine.in_dim),
                input=float(np.max(np.abs(h))) * margin,
                partial=partial * margin,
                output=out * margin,
                square=sq * margin,
                weight=float(np.max(np.abs(w))) if w.size else 0.0,
                bias=float(np.max(np.abs(b))) if b.size else 0.0,
            )
        )
        h = y * y if layer.square else y
    plan.ranges = [bd.peak for bd in bounds]
    return bounds


def _bits(x: float) -> float:
    return math.log2(x) if x > 0 else -math.inf


@dataclass
class _Checker:
    """Collects the margin (in bits) of every check; refuses on the first that does not fit."""

    packing: str
    worst: float = math.inf

    def fits(self, what: str, value: float, scale: float, modulus_bits: float, layer: int, shape: tuple) -> None:
        plain = what in ("weight", "bias")
        need = _bits(abs(value)) + _bits(scale) + (PLAIN_HEADROOM_BITS if plain else CIPHER_HEADROOM_BITS)
        room = modulus_bits - need
        self.worst = min(self.worst, room)
        if room < 0:
            raise PlanError(
                f"layer {layer} ({shape[1]}->{shape[0]}, {self.packing}): {what} {abs(value):.4g} at scale "
                f"2^{_bits(scale):.1f} needs {need:.1f} bits but the modulus there has {modulus_bits:.1f}; "
                "lower --precision, pin a larger --poly-degree, or rescale the model's inputs/weights"
            )


def verify(compiled: Any, bounds: list[LayerBound]) -> dict[str, float]:
    """Check `compiled` against `bounds` on the exact chain and schedule the server will use.

    Returns the smallest margin (bits) per packing; raises PlanError naming the layer and the
    value that does not fit.
    """
    from veil.he.seal_backend import SealBackend
    from veil.he.server import schedule

    backend = SealBackend(compiled.params)
    level_bits = [sum(math.log2(p) for p in backend.primes(lv)) for lv in range(backend.levels)]
    report: dict[str, float] = {}
    runs = [("latency", 0)]
    runs.append(("throughput", compiled.params.throughput_level))
    for packing, start in runs:
        check = _Checker(packing)
        steps = schedule(compiled, backend, start)
        for bd, step in zip(bounds, steps, strict=True):
            q = level_bits[step.level]
            product = step.scale_in * step.weight_scale
            check.fits("weight", bd.weight, step.weight_scale, q, bd.index, bd.shape)
            # throughput adds the bias to both samples of a slot (a complex constant, |b| * sqrt 2)
            check.fits("bias", bd.bias * math.sqrt(2.0), product, q, bd.index, bd.shape)
            check.fits("partial sum", bd.partial, product, q, bd.index, bd.shape)
            if step.square:
                level_sq = step.level + 1 if step.rescale else step.level
                scale_sq = product / backend.prime(step.level) if step.rescale else product
                check.fits("square", bd.square, scale_sq * scale_sq, level_bits[level_sq], bd.index, bd.shape)
            value = bd.square if step.square else bd.output
            check.fits("output", value, step.scale_out, level_bits[step.level_out], bd.index, bd.shape)
        report[packing] = round(check.worst, 2)
    return report


def measure_error(
    compiled: Any, x_calib: np.ndarray, latency_samples: int = 16, timings: bool = True
) -> dict[str, float]:
    """Max |encrypted - plaintext| score error on real SEAL ciphertexts, per packing.

    Latency runs `latency_samples` calibration samples (a random, fixed subset; at least one
    full ciphertext), throughput a full group (repeating the calibration set if it is smaller;
    it costs the same as one sample), so the tails are well sampled. Client and server code run
    in-process; `timings` (on the returned dict's `timings_ms`) are what one latency ciphertext
    and one throughput group cost end to end on this machine, base64 wire encoding included,
    which the client's packing choice uses as its cost model; `timings=False` skips them (the
    compiler's search measures candidates, and times only the one it keeps).
    """
    import time

    from veil.crypto.encoding import b64d, b64e
    from veil.he.client import HEClient
    from veil.he.keys import unpack_eval_keys
    from veil.he.packing import LATENCY, THROUGHPUT, throughput_group
    from veil.he.server import ServerModel

    client = HEClient(compiled.client_spec())
    be = client.backend
    server = ServerModel(compiled, be)
    blob = unpack_eval_keys(client.eval_keys())
    keys = be.load_eval_keys(blob.relin, blob.galois, blob.galois_elements)
    rng = np.random.default_rng(0)
    x_calib = np.asarray(x_calib, dtype=np.float64)
    per = server.layout.samples_per_ciphertext
    # a full latency ciphertext costs what one sample costs: measure at least that many
    count = max(latency_samples, per)
    pick = np.sort(rng.choice(len(x_calib), size=min(count, len(x_calib)), replace=False))
    # throughput: a full group, repeating the calibration set if it is smaller, so the maximum
    # is taken over as many noise draws as a real full request has
    full = np.resize(x_calib, (throughput_group(be.slot_count), x_calib.shape[1]))

    def run(packing: str, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        batch = client.encrypt(x, packing)
        level = 0 if packing == LATENCY else compiled.params.throughput_level
        wire = [b64d(b64e(c)) for c in batch.ciphertexts]
        cts = [be.load_ciphertext(c, level, server.input_scale) for c in wire]
        res = server.evaluate(packing, cts, keys)

        class _Result:
            ciphertexts = [b64d(b64e(be.serialize(c))) for c in res]

        scores = client.decrypt(_Result(), packing, len(x))  # type: ignore[arg-type]
        return scores, (time.perf_counter() - t0) * 1e3

    out: dict[str, Any] = {}
    for packing, x in ((LATENCY, x_calib[pick]), (THROUGHPUT, full)):
        scores, _ = run(packing, x)
        out[packing] = float(np.max(np.abs(scores - compiled.predict_plain(x))))
    if timings:
        # timed after a warm-up (the server encodes its latency plaintexts once per model)
        out["timings_ms"] = {
            "latency_per_ct": _median_ms(lambda: run(LATENCY, x_calib[pick[:per]])[1], 5, 41),
            "throughput_per_group": _median_ms(lambda: run(THROUGHPUT, full)[1], 3, 9),
        }
    return out


# how long the cost-model timings of one packing may take in all; a fast model gets more runs
TIMING_BUDGET_MS = 600.0


def _median_ms(once: Any, least: int, most: int) -> float:
    """Median of `once()` over at least `least` runs, more while the budget lasts (up to `most`).

    A millisecond-scale model timed five times on a shared machine is off by a single
    scheduler hiccup (the compile-time cost model missed the served figure by 40 % that way);
    a slow one is not worth more than a few runs.
    """
    times: list[float] = []
    while len(times) < least or (len(times) < most and sum(times) < TIMING_BUDGET_MS):
        times.append(float(once()))
    return float(np.median(times))
