"""Slot layouts and the cost model that picks one per request.

Latency mode: each sample owns a block of 2n slots holding [x, x] (x zero-padded to n, the
widest layer rounded up to a power of two), so rotations by k < n are cyclic within a block. A
layer is a diagonal mat-vec, z = sum_k d_k * rot(x, k), evaluated baby-step/giant-step so it
needs about 2*sqrt(#diagonals) rotations. Hidden layers use the n diagonals of the stacked
[W; W] (masked to the first half of each block) and end with one rotation that copies the
result to the second half, restoring [y, y]. The last layer uses only m diagonals (m = outputs
rounded up to a power of two) and sums the n/m partial results with log2(n/m) rotations.
Only the rotations this needs get Galois keys.

Throughput mode: one ciphertext per feature, sample s in slot s of every ciphertext. A layer
is a plain weighted sum of ciphertexts: no rotations and no Galois keys, the whole slot count of
samples at once.

All numpy here; `server` turns the diagonals into SEAL plaintexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from veil.he.params import CKKSParams, latency_block
from veil.he.plan import FusedPlan

LATENCY = "latency"
THROUGHPUT = "throughput"
PACKINGS = (LATENCY, THROUGHPUT)


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


@dataclass
class LatencyLayer:
    """One layer's latency-mode program (plaintext parts in numpy, full slot vectors)."""

    kind: str  # "full" (hidden layer, replicated output) or "hybrid" (last layer)
    baby: int
    giant: int
    # diagonals[j][i]: the diagonal k = j*baby + i, pre-rotated by -j*baby; None when all zero
    diagonals: list[list[np.ndarray | None]]
    bias: np.ndarray
    sum_steps: list[int]
    replicate_step: int | None
    square: bool

    def rotation_steps(self) -> set[int]:
        steps: set[int] = set()
        for j, row in enumerate(self.diagonals):
            used = [i for i, d in enumerate(row) if d is not None]
            steps.update(i for i in used if i)
            if used and j:
                steps.add(j * self.baby)
        steps.update(self.sum_steps)
        if self.replicate_step is not None:
            steps.add(self.replicate_step)
        return steps

    def rotation_count(self) -> int:
        baby = {i for row in self.diagonals for i, d in enumerate(row) if d is not None and i}
        giant = sum(1 for j, row in enumerate(self.diagonals) if j and any(d is not None for d in row))
        return len(baby) + giant + len(self.sum_steps) + (self.replicate_step is not None)

    def mult_count(self) -> int:
        return sum(1 for row in self.diagonals for d in row if d is not None)


@dataclass
class LatencyLayout:
    """Block geometry plus the per-layer programs of a plan in latency mode."""

    n: int
    slots: int
    layers: list[LatencyLayer] = field(default_factory=list)

    @property
    def block(self) -> int:
        return 2 * self.n

    @property
    def samples_per_ciphertext(self) -> int:
        return self.slots // self.block

    def rotation_steps(self) -> list[int]:
        steps: set[int] = set()
        for layer in self.layers:
            steps |= layer.rotation_steps()
        return sorted(s % self.slots for s in steps)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """Client side: samples (batch, d) -> slot vectors, blocks [x, x] one sample each."""
        per = self.samples_per_ciphertext
        vectors = []
        for start in range(0, len(x), per):
            chunk = x[start : start + per]
            vec = np.zeros(self.slots)
            for s, row in enumerate(chunk):
                base = s * self.block
                vec[base : base + row.size] = row
                vec[base + self.n : base + self.n + row.size] = row
            vectors.append(vec)
        return vectors

    def unpack(self, vectors: list[np.ndarray], batch: int, out_dim: int) -> np.ndarray:
        rows = []
        for vec in vectors:
            for s in range(self.samples_per_ciphertext):
                if len(rows) < batch:
                    rows.append(vec[s * self.block : s * self.block + out_dim])
        return np.asarray(rows)


def _bsgs(count: int) -> tuple[int, int]:
    baby = _pow2(math.ceil(math.sqrt(count)))
    return baby, math.ceil(count / baby)


def _layer_program(weight: np.ndarray, bias: np.ndarray, n: int, slots: int, last: bool, square: bool) -> LatencyLayer:
    m, d = weight.shape
    m_pad = _pow2(m)
    w_pad = np.zeros((m_pad, n))
    w_pad[:m, :d] = weight
    b_pad = np.zeros(m_pad)
    b_pad[:m] = bias
    blocks = slots // (2 * n)
    count = m_pad if last else n
    baby, giant = _bsgs(count)
    rows = np.arange(n)
    diagonals: list[list[np.ndarray | None]] = []
    for j in range(giant):
        row: list[np.ndarray | None] = []
        for i in range(baby):
            k = j * baby + i
            if k >= count:
                row.append(None)
                continue
            diag_block = w_pad[rows % m_pad, (rows + k) % n]
            if not np.any(diag_block):
                row.append(None)
                continue
            block = np.concatenate([diag_block, np.zeros(n)])
            row.append(np.roll(np.tile(block, blocks), j * baby))
        diagonals.append(row)
    if last:
        bias_block = np.zeros(2 * n)
        bias_block[:m] = bias
        steps = []
        s = n // 2
        while s >= m_pad:
            steps.append(s)
            s //= 2
        return LatencyLayer("hybrid", baby, giant, diagonals, np.tile(bias_block, blocks), steps, None, square)
    bias_block = np.concatenate([b_pad[rows % m_pad], np.zeros(n)])
    return LatencyLayer("full", baby, giant, diagonals, np.tile(bias_block, blocks), [], -n, square)


def latency_layout(plan: FusedPlan, slots: int) -> LatencyLayout:
    """Latency-mode programs for every layer of `plan` in a ring with `slots` slots."""
    n = latency_block(plan)
    if slots < 2 * n:
        raise ValueError(f"{slots} slots cannot hold a latency block of {2 * n}")
    layout = LatencyLayout(n=n, slots=slots)
    for idx, layer in enumerate(plan.layers):
        last = idx == len(plan.layers) - 1
        layout.layers.append(_layer_program(layer.affine.weight, layer.affine.bias, n, slots, last, layer.square))
    return layout


def throughput_pack(x: np.ndarray, slots: int) -> list[list[np.ndarray]]:
    """Client side: samples (batch, d) -> for each group of `slots` samples, one vector per feature."""
    groups = []
    for start in range(0, len(x), slots):
        chunk = x[start : start + slots]
        groups.append([chunk[:, f].copy() for f in range(x.shape[1])])
    return groups


# ------------------------------------------------------------------------------- cost model


def _unit(params: CKKSParams) -> float:
    n = params.poly_modulus_degree
    return (n / 8192) * (math.log2(n) / 13)


def estimate_ms(plan: FusedPlan, params: CKKSParams, layout: LatencyLayout, packing: str, batch: int) -> float:
    """Rough single-thread time of one request (encrypt + evaluate + decrypt) in `packing`.

    Coefficients are SEAL 4.1 timings at N = 8192 (key switching ~ k^2 in the number of primes
    k, products and encryption ~ k), scaled by N log N; good enough to rank the two packings.
    """
    unit = _unit(params)
    k0 = params.data_levels

    def rot(k: int) -> float:
        return 0.12 * k * (k + 1)

    def mul(k: int) -> float:
        return 0.07 * k

    if packing == LATENCY:
        cts = math.ceil(batch / layout.samples_per_ciphertext)
        cost, k = 0.0, k0
        for layer, fused in zip(layout.layers, plan.layers, strict=True):
            cost += layer.rotation_count() * rot(k) + layer.mult_count() * mul(k)
            k -= 1
            if fused.square:
                cost += rot(k) + mul(k)
                k -= 1
        return unit * cts * (cost + 0.9 * k0 + 0.5)
    groups = math.ceil(batch / params.slots)
    cost, k = 0.9 * k0 * plan.in_dim, k0
    for fused in plan.layers:
        w = fused.affine.weight
        cost += np.count_nonzero(w) * (mul(k) + 0.02 * k) + w.shape[0] * 0.1 * k
        k -= 1
        if fused.square:
            cost += w.shape[0] * (rot(k) + mul(k))
            k -= 1
    return unit * groups * (cost + 0.5 * plan.out_dim)


def choose_packing(plan: FusedPlan, params: CKKSParams, layout: LatencyLayout, batch: int) -> str:
    """The packing with the lower estimated cost for a request of `batch` samples."""
    lat = estimate_ms(plan, params, layout, LATENCY, batch)
    thr = estimate_ms(plan, params, layout, THROUGHPUT, batch)
    return LATENCY if lat <= thr else THROUGHPUT
