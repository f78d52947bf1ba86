"""CKKS parameter selection: the smallest secure ring that holds the plan at the wanted precision.

Depth comes from the fused plan (one prime per rescale). The scale comes from the precision
target and the noise growth through the layers; the first (last remaining) prime must hold the
largest calibrated intermediate value at that scale. The ring dimension N is the smallest whose
total modulus log2(QP) stays within the HomomorphicEncryption.org 128-bit table, and SEAL checks
the result with `sec_level=tc128` before anything is encrypted. A request outside the table is
refused with `InsecureParametersError`; nothing falls back to an insecure chain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from veil.he.errors import InsecureParametersError, PlanError
from veil.he.plan import FusedPlan

# HomomorphicEncryption.org security standard (2018), ternary secrets, classical 128-bit.
HE_STD_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60
MIN_SCALE_BITS = 20
SPECIAL_PRIME_SLACK = 6
# programs that key-switch only products on their large scale (rows rotating before the rescale,
# throughput's conjugation and relinearizations): the special prime's noise q_max/P * N is
# divided by a scale of 2**50 or more, so P may be this much smaller than the largest data prime
PRODUCT_SCALE_SPECIAL_SLACK = 16
MIN_SPECIAL_BITS = 20
# `fit_scale` (measured) chains: the largest scale a ring holds, under the noise model's choice
# by at most FIT_SCALE_SPAN bits (the model is pessimistic: mlp3 measured 2-4e-5 at 2^32 where it
# asks for 2^37), and for product-scale programs a special prime down to FIT_SPECIAL_BITS, up to
# FIT_SPECIAL_SLACK bits under the largest data prime (measured on the digits mlp3: a 17-bit P
# beside a 41-bit q0 added no visible error, since every key switch acts on a 2^64 product)
FIT_SCALE_SPAN = 8
FIT_SPECIAL_BITS = 17
FIT_SPECIAL_SLACK = 24
# a ciphertext value v at scale s must satisfy |v| s < Q/2 to decrypt: one bit over log2(range).
# SEAL refuses to encode a plaintext unless ceil(log2 |v| s) + 1 < log2 Q (two bits), which the
# biases get from the calibration margin (>= 2): ranges include margin * |b|. veil.he.bounds
# checks both on the exact chain.
RANGE_HEADROOM_BITS = 1
LAST_LAYER_MODES = ("unrescaled", "throughput-unrescaled", "rescaled")
# output error ~ NOISE_CONSTANT * sqrt(N) * gain / scale (fresh + rescale rounding noise, key
# switching, weight encoding). Calibrated on real ciphertexts (digits MLP: 2e-6 at 2^34 in both
# packings once squares are relinearized before their rescale; a three-part ciphertext's rescale
# rounding is multiplied by s^2 and cost 50-80x). The compiler measures the error on real
# ciphertexts anyway and adds bits when this model is optimistic.
NOISE_CONSTANT = 2.0
COEFF_NOISE_CONSTANT = 2.0


@dataclass(frozen=True)
class CKKSParams:
    """A parameter set: ring dimension, prime sizes (last = special key-switching prime), scales.

    `final_weight_bits` is the scale of the last layer's weights when that layer is not
    rescaled (its result is decrypted at scale 2**scale_bits * 2**final_weight_bits); None when
    every layer is rescaled. `throughput_level` is the level throughput ciphertexts start at:
    1 when the chain has a prime more than the throughput schedule needs (then throughput
    leaves its last layer unrescaled with `final_weight_bits` while latency rescales every
    layer, see `select_params`).
    """

    poly_modulus_degree: int
    coeff_bits: tuple[int, ...]
    scale_bits: int
    final_weight_bits: int | None = None
    security: str = "tc128"
    throughput_level: int = 0
    key_switching: bool = True  # False: one data prime and no special prime (nothing rotates or relinearizes)

    @property
    def log2_qp(self) -> int:
        return int(sum(self.coeff_bits))

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_levels(self) -> int:
        """Number of primes a fresh ciphertext carries (all but the special prime)."""
        return len(self.coeff_bits) - (1 if self.key_switching else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coeff_bits"] = list(self.coeff_bits)
        d["log2_qp"] = self.log2_qp
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CKKSParams:
        return cls(
            poly_modulus_degree=int(d["poly_modulus_degree"]),
            coeff_bits=tuple(int(b) for b in d["coeff_bits"]),
            scale_bits=int(d["scale_bits"]),
            final_weight_bits=None if d.get("final_weight_bits") is None else int(d["final_weight_bits"]),
            security=str(d.get("security", "tc128")),
            throughput_level=int(d.get("throughput_level", 0)),
            key_switching=bool(d.get("key_switching", True)),
        )


def check_secure(n: int, coeff_bits: tuple[int, ...] | list[int]) -> None:
    """Refuse (N, primes) outside the 128-bit table; SEAL re-checks in `seal_backend`."""
    if n not in HE_STD_128:
        raise InsecureParametersError(f"poly_modulus_degree {n} is not one of {sorted(HE_STD_128)}")
    total = int(sum(coeff_bits))
    if total > HE_STD_128[n]:
        raise InsecureParametersError(f"log2(QP) = {total} exceeds {HE_STD_128[n]} bits, the 128-bit limit for N = {n}")
    if any(b > MAX_PRIME_BITS or b < 2 for b in coeff_bits):
        raise InsecureParametersError(f"prime sizes {list(coeff_bits)} must be within 2..{MAX_PRIME_BITS} bits")


def plan_depth(plan: FusedPlan) -> int:
    """Rescales the plan needs if every layer rescales: one per affine map and one per square."""
    return len(plan.layers) + plan.n_squares


def latency_block(plan: FusedPlan) -> int:
    """Half-block n of the latency packing: the widest layer rounded up to a power of two."""
    widest = max(max(layer.affine.in_dim, layer.affine.out_dim) for layer in plan.layers)
    return 1 << max(0, math.ceil(math.log2(widest)))


def _noise_gain(plan: FusedPlan) -> float:
    """How much an input-sized error can grow through the plan (row l1 norms, square slopes)."""
    gain = 1.0
    for i, layer in enumerate(plan.layers):
        gain *= max(1.0, float(np.max(np.sum(np.abs(layer.affine.weight), axis=1))))
        if layer.square and plan.ranges:
            gain *= max(1.0, 2.0 * math.sqrt(plan.ranges[i]))
    return gain


def select_params(
    plan: FusedPlan,
    precision: float = 1e-4,
    poly_modulus_degree: int | None = None,
    last_layer: str = "unrescaled",
    coefficient_packing: bool = False,
    extra_scale_bits: int = 0,
    product_scale_switching: bool = False,
    fit_scale: bool = False,
) -> CKKSParams:
    """The smallest secure parameter set for `plan` with output error about `precision`.

    `plan` must be calibrated (`FusedPlan.calibrate`). Passing `poly_modulus_degree` pins N; a
    plan that does not fit it securely is refused rather than given fewer bits of precision.
    `last_layer`: "unrescaled" leaves the last layer unrescaled in every packing (coeff
    programs), "throughput-unrescaled" only in throughput (rows programs), "rescaled" nowhere
    (bsgs, whose baby steps rotate inputs at the input scale, where a large q0 adds noise).
    `coefficient_packing` (one affine layer, no square): nothing is ever key-switched, so the
    chain is a single prime without a special prime, and the noise is that of a coefficient.
    `extra_scale_bits` raises the scale above the noise model's choice (the compiler does when
    the error it measures on real ciphertexts misses the target; negative when it measured the
    model to be pessimistic). `product_scale_switching`: the program only key-switches products
    before their rescale, so the special prime may be `PRODUCT_SCALE_SPECIAL_SLACK` bits smaller
    than the largest data prime.
    `fit_scale`: when a ring cannot hold the noise model's scale, take the largest scale it can
    hold (at most `FIT_SCALE_SPAN` bits less), with q0 sized for the last layer's values only
    (`bounds.verify` checks every other value on the exact chain) and, for product-scale
    programs, a special prime down to `FIT_SPECIAL_BITS`. The noise model no longer vouches for
    such a chain: the compiler uses it only when it measures the error on real ciphertexts
    (that is what lets the depth-5 digits MLP into N=8192).
    """
    if last_layer not in LAST_LAYER_MODES:
        raise PlanError(f"last_layer must be one of {LAST_LAYER_MODES}")
    if coefficient_packing:
        return _select_coefficient_params(plan, precision, poly_modulus_degree, extra_scale_bits)
    if not plan.ranges:
        raise PlanError("calibrate the plan on sample inputs before selecting parameters")
    if precision <= 0:
        raise PlanError("precision must be positive")
    value_range = max([plan.input_range, *plan.ranges, 1.0])
    range_bits = math.ceil(math.log2(value_range)) + RANGE_HEADROOM_BITS
    gain = _noise_gain(plan)
    block = latency_block(plan)
    candidates = [poly_modulus_degree] if poly_modulus_degree else sorted(HE_STD_128)
    refusals: list[str] = []
    for n in candidates:
        if n not in HE_STD_128:
            raise InsecureParametersError(f"poly_modulus_degree {n} is not one of {sorted(HE_STD_128)}")
        if n // 2 < 2 * block:
            refusals.append(f"N={n}: {n // 2} slots < latency block {2 * block}")
            continue
        model_scale = _scale_bits(n, gain, precision) + extra_scale_bits
        found = _ring_params(n, model_scale, range_bits, plan, precision, last_layer, product_scale_switching, refusals)
        if found is None and fit_scale:
            last_bits = math.ceil(math.log2(max(plan.ranges[-1], 1.0))) + RANGE_HEADROOM_BITS
            for scale_bits in range(model_scale - 1, max(MIN_SCALE_BITS, model_scale - FIT_SCALE_SPAN) - 1, -1):
                found = _ring_params(
                    n, scale_bits, last_bits, plan, precision, last_layer, product_scale_switching, refusals, True
                )
                if found is not None:
                    break
        if found is not None:
            return found
    raise InsecureParametersError(
        "no 128-bit secure parameters hold this plan at the requested precision (" + "; ".join(refusals) + ")"
    )


def _ring_params(
    n: int,
    scale_bits: int,
    range_bits: int,
    plan: FusedPlan,
    precision: float,
    last_layer: str,
    product_scale_switching: bool,
    refusals: list[str],
    fitted: bool = False,
) -> CKKSParams | None:
    """The chain for ring `n` at `scale_bits` (see `select_params`), or None (reason in `refusals`)."""
    last = plan.layers[-1].affine
    last_in_range = plan.ranges[-2] if len(plan.ranges) > 1 else plan.input_range
    if scale_bits + range_bits > MAX_PRIME_BITS:
        refusals.append(f"N={n}: scale {scale_bits} + range {range_bits} bits exceed one prime")
        return None
    mids = plan_depth(plan) - 1
    # rounding w to 2**-wbits adds ~ sqrt(in) * |h| * 0.3 * 2**-wbits to each output
    need_wbits = math.ceil(math.log2(0.3 * math.sqrt(last.in_dim) * last_in_range / precision))
    options = []
    # the last weights' rounding error matters far less than the noise the scale bounds
    # (measured on digits: 19 vs 21 bits changed the error by 10 %), so when q0 would
    # overflow one prime they take what is left, down to what their rounding needs (the
    # compiler measures the result on real ciphertexts)
    wbits = max(need_wbits, min(max(MIN_SCALE_BITS, need_wbits), MAX_PRIME_BITS - scale_bits - range_bits))
    q0_lazy = scale_bits + wbits + range_bits
    # Leaving the last layer unrescaled saves a prime, so every ciphertext carries one prime
    # fewer (products, key switches, uploads all scale with the primes). The price: the
    # first prime q0 is large, and key-switching noise ~ q0/P * N. That is harmless on a
    # product's large scale (rows and coeff programs rotate before rescaling, throughput
    # relinearizes after its last product) but not on a fresh input at scale 2**scale_bits.
    if last_layer == "unrescaled" and q0_lazy <= MAX_PRIME_BITS:
        options.append(((q0_lazy, *([scale_bits] * mids)), wbits, 0))
    elif last_layer == "throughput-unrescaled" and q0_lazy <= MAX_PRIME_BITS:
        # both: latency starts at level 0 and rescales every layer (its last weights are
        # vectors, whose encoding error needs a full-size scale); throughput starts one prime
        # lower, so every product it makes carries one prime fewer, and leaves its last
        # layer (scalar weights, exact to 2**-wbits) unrescaled in the large q0
        options.append(((q0_lazy, *([scale_bits] * (mids + 1))), wbits, 1))
    options.append(((scale_bits + range_bits, *([scale_bits] * (mids + 1))), None, 0))
    for data_bits, final_wbits, thr_level in options:
        # key-switching noise shrinks with the special prime, which costs no ciphertext size:
        # take the largest the budget allows; a few bits under the largest data prime only
        # adds noise far below the scale
        special = min(MAX_PRIME_BITS, HE_STD_128[n] - sum(data_bits))
        bits = (*data_bits, special)
        slack = PRODUCT_SCALE_SPECIAL_SLACK if product_scale_switching else SPECIAL_PRIME_SLACK
        floor = MIN_SPECIAL_BITS
        if fitted and product_scale_switching:
            slack, floor = FIT_SPECIAL_SLACK, FIT_SPECIAL_BITS
        if special < max(floor, max(data_bits) - slack):
            refusals.append(f"N={n}: log2(QP)={sum(data_bits) + max(data_bits)} > {HE_STD_128[n]}")
            continue
        if (
            last_layer == "rescaled"
            and not product_scale_switching
            and special < _rotation_special_bits(n, data_bits[0], scale_bits, precision)
        ):
            refusals.append(f"N={n}: special prime {special} bits too small for rotations at the input scale")
            continue
        check_secure(n, bits)
        return CKKSParams(n, tuple(int(b) for b in bits), int(scale_bits), final_wbits, "tc128", thr_level)
    return None


def _rotation_special_bits(n: int, q0_bits: int, scale_bits: int, precision: float) -> int:
    """Special prime a program needs when it rotates ciphertexts at the input scale (bsgs, conv).

    Key switching adds noise ~ N^2 * q0 / P in absolute terms (measured on SEAL 4.1: Wine LR in
    bsgs at N=4096 gave 1.7e-4 ... 8.7e-3 as P shrank from q0 + 8 to q0 - 4 bits, at scale
    2^27); keep it an eighth of the target at the input scale.
    """
    return q0_bits - scale_bits + math.ceil(math.log2(8.0 * n * n / precision))


def _scale_bits(n: int, gain: float, precision: float, constant: float = NOISE_CONSTANT) -> int:
    return max(MIN_SCALE_BITS, math.ceil(math.log2(constant * math.sqrt(n) * gain / precision)))


def _select_coefficient_params(
    plan: FusedPlan, precision: float, poly_modulus_degree: int | None, extra_scale_bits: int = 0
) -> CKKSParams:
    """One prime q0 = scale + weight bits + range, in the smallest ring that allows it.

    The scale is sized for throughput's slot noise (which has the sqrt(N) a coefficient does
    not); the weights, exact to 2**-wbits in both packings, get whatever q0 has left over what
    their rounding needs.
    """
    if len(plan.layers) != 1 or plan.layers[0].square:
        raise PlanError("coefficient packing takes one affine layer without a square")
    affine = plan.layers[0].affine
    range_bits = math.ceil(math.log2(max([plan.input_range, *plan.ranges, 1.0]))) + RANGE_HEADROOM_BITS
    gain = _noise_gain(plan)
    need_wbits = math.ceil(math.log2(0.3 * math.sqrt(affine.in_dim) * plan.input_range / precision))
    candidates = [poly_modulus_degree] if poly_modulus_degree else sorted(HE_STD_128)
    refusals: list[str] = []
    for n in candidates:
        if n not in HE_STD_128:
            raise InsecureParametersError(f"poly_modulus_degree {n} is not one of {sorted(HE_STD_128)}")
        scale_bits = _scale_bits(n, gain, precision, COEFF_NOISE_CONSTANT) + extra_scale_bits
        cap = min(MAX_PRIME_BITS, HE_STD_128[n])
        wbits = cap - scale_bits - range_bits
        if wbits < need_wbits or (affine.out_dim + 1) * affine.in_dim > n:
            refusals.append(f"N={n}: {scale_bits}+{need_wbits}+{range_bits} bits or the coefficients do not fit")
            continue
        check_secure(n, (cap,))
        return CKKSParams(n, (cap,), scale_bits, wbits, "tc128", 0, key_switching=False)
    raise InsecureParametersError("no 128-bit secure ring holds this layer (" + "; ".join(refusals) + ")")
