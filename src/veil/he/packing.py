"""Slot layouts and the cost model that picks one per request.

Latency mode serves one request as fast as it can, with one of three programs chosen when the
model is compiled (the client spec names it):

- **coeff** (one affine layer, no activation: logistic/linear regression, linear SVM). The
  client encodes sample s as the polynomial sum_i x_si X**(s*S + i); the server multiplies by
  the polynomial sum_r sum_i W_ri X**(r*D + D-1-i) and adds the bias. Coefficient
  s*S + r*D + D-1 of the product is (W x_s + b)_r. One plaintext product, no rotation, no
  Galois key (`slots` converts between coefficients and slots).
- **rows** (two or three layers that fit in the slots, e.g. a small MLP). The client sends x in
  every row block as [x, x] (blocks of 2D, D = input width rounded up to a power of two, one
  block per output unit of the first layer). Layer 1 multiplies block r by [W_r, W_r] and sums
  each block with log2(D) rotations, so block r holds y_r in its first D+1 slots. Layer 2
  multiplies block r, slot q by V_qr and sums across blocks with log2(blocks) rotations: slot q
  of each sample's first block holds z_q, every other slot is zero. This uses the slots a
  per-sample block would leave empty instead of spending rotations on baby steps. A third
  layer (a sample fills the ciphertext, so that cross-block sum is cyclic and *every* block
  holds z in its first slots) multiplies block p by U_p and sums its first slots with
  log2(width) rotations, the steps layer 1 already has keys for: u_p lands in slot 0 of block p
  (`out_stride` = one block). Every rotation acts on a product before its rescale, so key
  switching never touches a small scale and the special prime can be small.
- **conv** (a convolution, its activation, a dense last layer: CryptoNets-style CNNs). The client
  lays each sample out as zero-padded image grids, one copy per output channel (multiplexed
  channels); the conv is then C_in*k*k diagonals at fixed offsets, applied baby-step/giant-step
  with rotations shared by every kernel, and the dense layer is m diagonals and a
  rotate-and-sum (`conv_grid`). Several samples share a ciphertext.
- **bsgs** (anything else). Each sample owns a block of 2n slots holding [x, x] (x zero-padded to
  n, the widest layer rounded up to a power of two), so rotations by k < n are cyclic within a
  block. A layer is a diagonal mat-vec, z = sum_k d_k * rot(x, k), evaluated baby-step/giant-step
  so it needs about 2*sqrt(#diagonals) rotations. Hidden layers use the n diagonals of the
  stacked [W; W] (masked to the first half of each block) and end with one rotation that copies
  the result to the second half, restoring [y, y]. The last layer uses only m diagonals (m =
  outputs rounded up to a power of two) and sums the n/m partial results with log2(n/m)
  rotations.

Only the rotations a program needs get Galois keys.

Throughput mode: one ciphertext per feature and two samples per slot: sample s of a group of
2*(N/2) in the real part of slot s, sample s + N/2 in the imaginary part. A layer is a weighted
sum of ciphertexts with real scalar weights, which act on both parts independently: no rotation
and no Galois key for linear models. A square would mix the parts, so before the first square
one conjugation splits the stream: c + conj(c) = 2 Re c and c - conj(c) = 2i Im c (the 1/2 is
folded into the layer's weights), squared separately, the second negated. Squares are
relinearized lazily: the next layer's weighted sums run on the three-part products and only
its outputs are relinearized (relinearization is linear).

All numpy here; `server` turns the vectors into SEAL plaintexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from veil.he.params import CKKSParams, latency_block
from veil.he.plan import FusedPlan
from veil.he.slots import coeffs_to_slots, slots_to_coeffs

LATENCY = "latency"
THROUGHPUT = "throughput"
PACKINGS = (LATENCY, THROUGHPUT)
COEFF, ROWS, BSGS, CONV = "coeff", "rows", "bsgs", "conv"
LATENCY_KINDS = (COEFF, ROWS, BSGS, CONV)


def _pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def _log2(x: int) -> int:
    return int(math.log2(x))


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
class SlotLayer:
    """A rows-program layer: one plaintext product, the bias, then rotate-and-sum by `sum_steps`."""

    weights: np.ndarray  # a full slot vector (real), or N/2 complex slot values for coeff
    bias: np.ndarray
    sum_steps: list[int]
    square: bool
    # rescale before the rotate-and-sum: the rotations run one prime lighter (~40 % cheaper at
    # four primes) but their key-switching rounding lands on the rescaled scale (about 3 more
    # scale bits buy that back; the parameter selector adds them, see compile._choose_params)
    rescale_first: bool = False

    def rotation_steps(self) -> set[int]:
        return set(self.sum_steps)

    def rotation_count(self) -> int:
        return len(self.sum_steps)

    def mult_count(self) -> int:
        return 1


@dataclass
class LatencyLayout:
    """Latency-mode geometry (shared by client and server) plus the server's per-layer programs.

    kind coeff: n = D (input width), blocks = M (outputs); a sample spans S = (M+1)*D coefficients.
    kind rows: n = D (input width rounded up), blocks = M (first layer's outputs rounded up);
    a sample spans M blocks of 2D slots. kind bsgs: n = half-block, blocks = 1. kind conv:
    n = half the sample span, blocks = 1, and `in_slots[c, j]` is where copy c of feature j goes
    (one copy of the padded image per output channel).
    """

    n: int
    slots: int
    kind: str = BSGS
    blocks: int = 1
    layers: list = field(default_factory=list)  # SlotLayer (coeff, rows) or LatencyLayer (bsgs, conv)
    in_slots: np.ndarray | None = None
    # rows with a sparse first layer (a convolution): block r holds x[gather[r]] (-1: zero), so
    # a block is sized by the receptive field, not the input (the client does the im2col)
    gather: np.ndarray | None = None
    # slots between consecutive outputs of a sample (three-layer rows: one per block)
    out_stride: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LATENCY_KINDS:
            raise ValueError(f"unknown latency layout {self.kind!r}")
        if self.n < 1 or self.blocks < 1 or self.samples_per_ciphertext < 1:
            raise ValueError(
                f"a {self.kind} layout of n={self.n}, blocks={self.blocks} does not fit {self.slots} slots"
            )

    @property
    def block(self) -> int:
        return 2 * self.n

    @property
    def complex_slots(self) -> bool:
        """Coefficient packing needs complex slot values (a real polynomial is not real in slots)."""
        return self.kind == COEFF

    @property
    def sample_stride(self) -> int:
        if self.kind == COEFF:
            return (self.blocks + 1) * self.n
        return self.blocks * self.block

    @property
    def samples_per_ciphertext(self) -> int:
        capacity = 2 * self.slots if self.kind == COEFF else self.slots
        return capacity // self.sample_stride

    def to_spec(self) -> dict:
        spec: dict = {"kind": self.kind, "n": self.n, "blocks": self.blocks}
        if self.in_slots is not None:
            spec["in_slots"] = self.in_slots.tolist()
        if self.gather is not None:
            spec["gather"] = self.gather.tolist()
        if self.out_stride != 1:
            spec["out_stride"] = self.out_stride
        return spec

    @classmethod
    def from_spec(cls, spec: dict, slots: int) -> LatencyLayout:
        in_slots = None
        if spec.get("in_slots") is not None:
            in_slots = np.asarray(spec["in_slots"], dtype=np.int64)
            if in_slots.ndim != 2 or in_slots.min() < 0 or in_slots.max() >= 2 * int(spec["n"]):
                raise ValueError("in_slots must be a (copies, features) array of slots inside the sample span")
        gather = None
        if spec.get("gather") is not None:
            gather = np.asarray(spec["gather"], dtype=np.int64)
            if gather.ndim != 2 or gather.shape[1] > int(spec["n"]) or gather.shape[0] > int(spec["blocks"]):
                raise ValueError("gather must be a (blocks, n) array of feature indices")
        return cls(
            n=int(spec["n"]),
            slots=slots,
            kind=str(spec["kind"]),
            blocks=int(spec["blocks"]),
            in_slots=in_slots,
            gather=gather,
            out_stride=int(spec.get("out_stride", 1)),
        )

    def rotation_steps(self) -> list[int]:
        steps: set[int] = set()
        for layer in self.layers:
            steps |= layer.rotation_steps()
        return sorted(s % self.slots for s in steps)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """Client side: samples (batch, d) -> the vectors to encode, one per ciphertext."""
        per, stride = self.samples_per_ciphertext, self.sample_stride
        vectors = []
        for start in range(0, len(x), per):
            chunk = x[start : start + per]
            if self.kind == COEFF:
                coeffs = np.zeros(2 * self.slots)
                for s, row in enumerate(chunk):
                    coeffs[s * stride : s * stride + row.size] = row
                vectors.append(coeffs_to_slots(coeffs, 2 * self.slots))
                continue
            vec = np.zeros(self.slots)
            if self.kind == CONV:
                assert self.in_slots is not None
                for s, row in enumerate(chunk):
                    vec[s * stride + self.in_slots] = row[None, :]
                vectors.append(vec)
                continue
            if self.gather is not None:
                g = self.gather
                for s, row in enumerate(chunk):
                    vals = np.where(g >= 0, row[np.maximum(g, 0)], 0.0)  # (blocks, width)
                    for r in range(len(g)):
                        base = s * stride + r * self.block
                        vec[base : base + g.shape[1]] = vals[r]
                        vec[base + self.n : base + self.n + g.shape[1]] = vals[r]
                vectors.append(vec)
                continue
            copies = self.blocks if self.kind == ROWS else 1
            for s, row in enumerate(chunk):
                for r in range(copies):
                    base = s * stride + r * self.block
                    vec[base : base + row.size] = row
                    vec[base + self.n : base + self.n + row.size] = row
            vectors.append(vec)
        return vectors

    def unpack(self, vectors: list[np.ndarray], batch: int, out_dim: int) -> np.ndarray:
        """Client side: decoded result vectors (complex for coeff) -> scores (batch, out_dim)."""
        per, stride = self.samples_per_ciphertext, self.sample_stride
        rows = []
        for vec in vectors:
            if self.kind == COEFF:
                coeffs = slots_to_coeffs(vec, 2 * self.slots)
                positions = np.arange(out_dim) * self.n + self.n - 1
                values = [coeffs[s * stride + positions] for s in range(per)]
            else:
                positions = np.arange(out_dim) * self.out_stride
                if positions[-1] >= stride:
                    raise ValueError(f"{out_dim} outputs {self.out_stride} slots apart do not fit a sample")
                values = [vec[s * stride + positions] for s in range(per)]
            rows.extend(np.real(v) for v in values)
        return np.asarray(rows[:batch])


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


def _coeff_program(plan: FusedPlan, layout: LatencyLayout) -> SlotLayer:
    """One affine layer as a polynomial product: output r of sample s at s*S + r*D + D-1."""
    affine = plan.layers[0].affine
    m, d = affine.weight.shape
    n_ring, stride = 2 * layout.slots, layout.sample_stride
    weight = np.zeros(n_ring)
    for r in range(m):
        weight[r * d + d - 1 - np.arange(d)] = affine.weight[r]
    bias = np.zeros(n_ring)
    for s in range(layout.samples_per_ciphertext):
        bias[s * stride + np.arange(m) * d + d - 1] = affine.bias
    return SlotLayer(coeffs_to_slots(weight, n_ring), coeffs_to_slots(bias, n_ring), [], False)


def _rows_programs(plan: FusedPlan, layout: LatencyLayout, rescale_first: bool = False) -> list[SlotLayer]:
    """Layer 1 per row block, then layer 2 per column across the blocks (rows takes two layers).

    `rescale_first` rescales both layers before their sums (see `SlotLayer.rescale_first`)."""
    first = plan.layers[0].affine
    m, d = first.weight.shape
    big, block, stride = layout.n, layout.block, layout.sample_stride
    weights, bias = np.zeros(layout.slots), np.zeros(layout.slots)
    g = layout.gather
    rows = first.weight if g is None else np.where(g >= 0, np.take_along_axis(first.weight, np.maximum(g, 0), 1), 0)
    d = rows.shape[1]
    for s in range(layout.samples_per_ciphertext):
        for r in range(m):
            base = s * stride + r * block
            weights[base : base + d] = rows[r]
            weights[base + big : base + big + d] = rows[r]
            # one bias copy in every window the in-block sum reads (slot 0 or slot D)
            bias[base] = bias[base + big] = first.bias[r]
    steps = [big >> (k + 1) for k in range(_log2(big))]
    row_layer = SlotLayer(weights, bias, steps, plan.layers[0].square, rescale_first)
    second = plan.layers[1].affine
    q = second.out_dim
    weights, bias = np.zeros(layout.slots), np.zeros(layout.slots)
    for s in range(layout.samples_per_ciphertext):
        for r in range(m):
            weights[s * stride + r * block : s * stride + r * block + q] = second.weight[:, r]
        bias[s * stride : s * stride + q] = second.bias
    steps = [block * (layout.blocks >> (k + 1)) for k in range(_log2(layout.blocks))]
    programs = [row_layer, SlotLayer(weights, bias, steps, plan.layers[1].square, rescale_first)]
    if len(plan.layers) == 3:  # z is in slots [0, q) of every block (cyclic sum): layer 3 per block
        third = plan.layers[2].affine
        weights, bias = np.zeros(layout.slots), np.zeros(layout.slots)
        for p in range(third.out_dim):
            weights[p * block : p * block + q] = third.weight[p]
            bias[p * block] = third.bias[p]
        steps = [_pow2(q) >> (k + 1) for k in range(_log2(_pow2(q)))]
        programs.append(SlotLayer(weights, bias, steps, plan.layers[2].square, rescale_first))
    return programs


# ------------------------------------------------------------------------------ conv program


@dataclass
class ConvGrid:
    """The client's slot layout for a conv program (see `conv_grid`)."""

    in_slots: np.ndarray  # (C_out copies, features) slot of each input feature
    anchors: np.ndarray  # (C_out*Ho*Wo,) slot of each conv output: its receptive field's corner
    span: int  # slots per sample (a power of two)


def conv_grid(plan: FusedPlan) -> ConvGrid:
    """Multiplexed padded-image layout: one copy of the input per output channel.

    A sample's span starts with m_pad free slots (where the last layer's outputs are summed);
    then output channel c's block holds the C_in zero-padded Hp x Wp grids. Conv output
    (c, y, x) is written at the slot of its receptive field's top-left corner in block c, so
    input (ci, y*s + dy, x*s + dx) is always `ci*G + dy*Wp + dx` slots further on: the whole
    layer is C_in*k*k diagonals, whatever the number of output channels, and the rotations are
    shared by every kernel.
    """
    geo = plan.layers[0].affine.conv
    assert geo is not None
    c_in, h, w = geo.in_shape
    c_out, ho, wo = geo.out_shape
    (kh, kw), (sh, sw), (pt, pl) = geo.kernel, geo.stride, geo.pad
    hp = max(h + pt, (ho - 1) * sh + kh)
    wp = max(w + pl, (wo - 1) * sw + kw)
    grid = hp * wp
    block = c_in * grid
    origin = _pow2(plan.layers[-1].affine.out_dim)
    ci, r, q = np.meshgrid(np.arange(c_in), np.arange(h), np.arange(w), indexing="ij")
    local = (ci * grid + (r + pt) * wp + (q + pl)).reshape(-1)
    in_slots = origin + np.arange(c_out)[:, None] * block + local[None, :]
    co, yy, xx = np.meshgrid(np.arange(c_out), np.arange(ho), np.arange(wo), indexing="ij")
    anchors = (origin + co * block + yy * sh * wp + xx * sw).reshape(-1)
    return ConvGrid(in_slots, anchors, _pow2(origin + c_out * block))


def _best_baby(offsets: set[int]) -> int:
    """Baby-step size b minimising the rotations sum_k k = g*b + i needs (distinct i and g, not 0)."""
    best, best_cost = 1, math.inf
    for b in range(1, max(offsets) + 2):
        cost = len({k % b for k in offsets} - {0}) + len({k // b for k in offsets} - {0})
        if cost < best_cost:
            best, best_cost = b, cost
    return best


def _diag_layer(diags: dict[int, np.ndarray], bias: np.ndarray, sum_steps: list[int], square: bool) -> LatencyLayer:
    """Sparse diagonals (offset -> full slot vector) as a baby-step/giant-step LatencyLayer."""
    baby = _best_baby(set(diags))
    giant = max(diags) // baby + 1
    grid: list[list[np.ndarray | None]] = [[None] * baby for _ in range(giant)]
    for k, d in diags.items():
        j, i = divmod(k, baby)
        grid[j][i] = np.roll(d, j * baby)
    return LatencyLayer("hybrid" if sum_steps else "full", baby, giant, grid, bias, sum_steps, None, square)


def _conv_programs(plan: FusedPlan, layout: LatencyLayout, grid: ConvGrid) -> list[LatencyLayer]:
    """The conv layer by its kernel offsets, then the dense last layer as m_pad diagonals + a rotate-and-sum.

    Both are built from the dense matrices and the slot maps, so they compute exactly what the
    fused plan does; the geometry only makes the diagonals few.
    """
    span, per, slots = grid.span, layout.samples_per_ciphertext, layout.slots
    tile = np.arange(per)[:, None] * span

    def full(index: np.ndarray, values: np.ndarray) -> np.ndarray:
        vec = np.zeros(slots)
        vec[(tile + index[None, :]).reshape(-1)] = np.tile(values, per)
        return vec

    conv = plan.layers[0].affine
    rows, cols = np.nonzero(conv.weight)
    # output i (channel c) reads the copy of the input in its own channel block
    channel = rows // (conv.out_dim // conv.conv.out_shape[0])  # type: ignore[union-attr]
    offsets = grid.in_slots[channel, cols] - grid.anchors[rows]
    if offsets.min() < 0:
        raise ValueError("the conv layout puts an input before its output's anchor")
    diags = {
        int(k): full(grid.anchors[rows[offsets == k]], conv.weight[rows[offsets == k], cols[offsets == k]])
        for k in np.unique(offsets)
    }
    first = _diag_layer(diags, full(grid.anchors, conv.bias), [], plan.layers[0].square)
    dense = plan.layers[1].affine
    m_pad = _pow2(dense.out_dim)
    q, j = np.nonzero(dense.weight)
    t = grid.anchors[j]
    k = (t - q) % m_pad
    diags = {int(kk): full(t[k == kk] - kk, dense.weight[q[k == kk], j[k == kk]]) for kk in np.unique(k)}
    steps = [span >> (e + 1) for e in range(_log2(span // m_pad))]
    last = _diag_layer(diags, full(np.arange(dense.out_dim), dense.bias), steps, plan.layers[1].square)
    return [first, last]


def _conv_fits(plan: FusedPlan, slots: int) -> ConvGrid | None:
    if len(plan.layers) != 2 or plan.layers[0].affine.conv is None:
        return None
    grid = conv_grid(plan)
    return grid if grid.span <= slots else None


def _fitting_kind(plan: FusedPlan, slots: int) -> tuple[str, int, int]:
    """The cheapest latency program this plan fits: (kind, n, blocks)."""
    first = plan.layers[0].affine
    if len(plan.layers) == 1 and not plan.layers[0].square and (first.out_dim + 1) * first.in_dim <= 2 * slots:
        return COEFF, first.in_dim, first.out_dim
    blocks = _pow2(first.out_dim)
    if len(plan.layers) in (2, 3):
        gather = row_gather(plan)
        big = _pow2(first.in_dim if gather is None else gather.shape[1])
        fits = blocks * 2 * big <= slots and plan.layers[1].affine.out_dim <= big
        if fits and len(plan.layers) == 2:
            return ROWS, big, blocks
        # three layers: one sample fills the ciphertext (padding blocks have zero weights), and
        # layer 3 has a block per output
        if fits and plan.layers[2].affine.out_dim <= slots // (2 * big):
            return ROWS, big, slots // (2 * big)
    grid = _conv_fits(plan, slots)
    if grid is not None:
        return CONV, grid.span // 2, 1
    return BSGS, latency_block(plan), 1


def row_gather(plan: FusedPlan) -> np.ndarray | None:
    """For a sparse first layer (a convolution's matrix): each row's nonzero columns, -1 padded.

    None when the rows are dense enough that gathering would not shrink the block (a power of
    two at least the input width).
    """
    w = plan.layers[0].affine.weight
    nnz = np.count_nonzero(w, axis=1)
    width = max(1, int(nnz.max()))
    if _pow2(width) >= _pow2(w.shape[1]):
        return None
    gather = np.full((w.shape[0], width), -1, dtype=np.int64)
    for r in range(w.shape[0]):
        cols = np.flatnonzero(w[r])
        gather[r, : len(cols)] = cols
    return gather


def latency_layout(plan: FusedPlan, slots: int, kind: str = "auto", rescale_first: bool = False) -> LatencyLayout:
    """Latency-mode programs for every layer of `plan` in a ring with `slots` slots.

    `kind` "auto" takes coeff, else rows (gathered for a sparse first layer), else conv, else
    bsgs, whichever the plan fits first; naming a kind the plan does not fit raises ValueError
    (conv may be named whenever the first layer is a convolution). `rescale_first` (rows only)
    rescales the first layer before its rotate-and-sum.
    """
    best, n, blocks = _fitting_kind(plan, slots)
    if kind == "auto":
        kind = best
    if kind == BSGS:
        n, blocks = latency_block(plan), 1
    elif kind == CONV:  # the multiplexed program, where the plan has a conv first layer
        grid = _conv_fits(plan, slots)
        if grid is None:
            raise ValueError(f"this plan does not fit the conv latency program (it fits {best})")
        layout = LatencyLayout(n=grid.span // 2, slots=slots, kind=kind, blocks=1, in_slots=grid.in_slots)
        layout.layers.extend(_conv_programs(plan, layout, grid))
        return layout
    elif kind != best:
        raise ValueError(f"this plan does not fit the {kind} latency program (it fits {best})")
    if kind == BSGS and slots < 2 * n:
        raise ValueError(f"{slots} slots cannot hold a latency block of {2 * n}")
    gather = row_gather(plan) if kind == ROWS else None
    out_stride = 2 * n if kind == ROWS and len(plan.layers) == 3 else 1
    layout = LatencyLayout(n=n, slots=slots, kind=kind, blocks=blocks, gather=gather, out_stride=out_stride)
    if kind == COEFF:
        layout.layers.append(_coeff_program(plan, layout))
    elif kind == ROWS:
        layout.layers.extend(_rows_programs(plan, layout, rescale_first))
    else:
        for idx, layer in enumerate(plan.layers):
            last = idx == len(plan.layers) - 1
            layout.layers.append(_layer_program(layer.affine.weight, layer.affine.bias, n, slots, last, layer.square))
    return layout


# ------------------------------------------------------------------------------ throughput


def throughput_group(slots: int) -> int:
    """Samples per group of ciphertexts: two per slot (real and imaginary part)."""
    return 2 * slots


def throughput_splits(plan: FusedPlan) -> bool:
    """Whether the complex stream is split into two real ones (needed before the first square)."""
    return plan.n_squares > 0


def throughput_out_cts(plan: FusedPlan) -> int:
    """Result ciphertexts per group: one per output, or two (one per sample half) after a split."""
    return plan.out_dim * (2 if throughput_splits(plan) else 1)


def throughput_pack(x: np.ndarray, slots: int) -> list[list[np.ndarray]]:
    """Client side: samples (batch, d) -> per group of 2*slots samples, one complex vector per feature.

    Sample s of a group sits in slot s (real part) for s < slots, else in slot s - slots
    (imaginary part). Real weights act on both parts independently.
    """
    groups = []
    for start in range(0, len(x), 2 * slots):
        chunk = x[start : start + 2 * slots]
        vectors = np.zeros((slots, x.shape[1]), dtype=np.complex128)
        vectors[: min(slots, len(chunk))] = chunk[:slots]
        if len(chunk) > slots:
            vectors[: len(chunk) - slots] += 1j * chunk[slots:]
        groups.append([vectors[:, f].copy() for f in range(x.shape[1])])
    return groups


def throughput_unpack(vectors: list[np.ndarray], split: bool, out_dim: int, samples: int) -> np.ndarray:
    """Client side: one group's decoded result vectors -> scores (samples, out_dim)."""
    slots = len(vectors[0])
    if split:  # out_dim real results for the first half, then out_dim for the second
        first = np.stack([np.real(v) for v in vectors[:out_dim]], axis=1)
        second = np.stack([np.real(v) for v in vectors[out_dim:]], axis=1)
    else:
        first = np.stack([np.real(v) for v in vectors], axis=1)
        second = np.stack([np.imag(v) for v in vectors], axis=1)
    return np.concatenate([first, second[: max(0, samples - slots)]], axis=0)[:samples]


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
            k = max(1, k - 1)
            if fused.square:
                cost += rot(k) + mul(k)
                k = max(1, k - 1)
        return unit * cts * (cost + 0.9 * k0 + 0.5)
    groups = math.ceil(batch / throughput_group(params.slots))
    cost, k = 0.9 * k0 * plan.in_dim, k0
    for fused in plan.layers:
        w = fused.affine.weight
        cost += np.count_nonzero(w) * (mul(k) + 0.02 * k) + w.shape[0] * 0.1 * k
        k = max(1, k - 1)
        if fused.square:  # the split (a conjugation) and two squares per unit
            cost += w.shape[0] * (rot(k) + 2 * mul(k))
            k = max(1, k - 1)
    return unit * groups * (cost + 0.5 * throughput_out_cts(plan))


def choose_packing(plan: FusedPlan, params: CKKSParams, layout: LatencyLayout, batch: int) -> str:
    """The packing with the lower estimated cost for a request of `batch` samples."""
    lat = estimate_ms(plan, params, layout, LATENCY, batch)
    thr = estimate_ms(plan, params, layout, THROUGHPUT, batch)
    return LATENCY if lat <= thr else THROUGHPUT
