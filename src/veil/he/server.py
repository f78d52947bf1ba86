"""The server: evaluate a compiled plan on ciphertexts, in either packing.

Latency mode runs the layout's program (`packing`): coeff and rows are one product and a
rotate-and-sum per layer, bsgs and conv the (sparse) diagonal method. Squares are relinearized lazily: the
three-part result goes through the next product and rescale and is relinearized only before a
rotation, another square or the reply, where it is cheaper (fewer primes left).

Per layer: weights are encoded at the scale of the prime the layer's rescale will drop (times
the input scale's drift), the bias is added before that single rescale, so every layer leaves
its result at exactly the input scale and the next layer's plaintexts can be prepared once per
model. The last layer may skip its rescale (decided by the parameter selector) and is decrypted
at scale * 2**final_weight_bits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from veil.he.compiled import CompiledModel
from veil.he.errors import HEError
from veil.he.packing import BSGS, CONV, LATENCY, THROUGHPUT, LatencyLayout, latency_layout, throughput_splits
from veil.he.seal_backend import EvalKeys, SealBackend


@dataclass(frozen=True)
class Step:
    """Scales and levels of one layer, fixed by the parameters (computed once per model)."""

    level: int  # level of the layer's input
    scale_in: float
    weight_scale: float
    rescale: bool
    square: bool
    scale_out: float  # after the layer (and its square, if any)
    level_out: int


def schedule(compiled: CompiledModel, backend: SealBackend, start_level: int = 0) -> list[Step]:
    """Walk the plan through the modulus chain from `start_level`: which prime each rescale drops.

    A chain one prime short of the plan's depth leaves the last layer unrescaled, with its
    weights at 2**final_weight_bits.
    """
    params = compiled.params
    delta = 2.0**params.scale_bits
    level, scale = start_level, delta
    steps = []
    last = len(compiled.plan.layers) - 1
    spare = backend.levels - 1 - start_level - (len(compiled.plan.layers) + compiled.plan.n_squares)
    for i, layer in enumerate(compiled.plan.layers):
        rescale = not (i == last and spare < 0 and params.final_weight_bits is not None)
        if rescale:
            w_scale = backend.prime(level) * delta / scale
            out_scale, out_level = delta, level + 1
        else:
            w_scale = 2.0**params.final_weight_bits
            out_scale, out_level = scale * w_scale, level
        if layer.square:
            out_scale = out_scale * out_scale / backend.prime(out_level)
            out_level += 1
        if out_level > backend.levels - 1:
            raise HEError("bad_model", "the plan is deeper than its modulus chain", 500)
        steps.append(Step(level, scale, w_scale, rescale, layer.square, out_scale, out_level))
        level, scale = out_level, out_scale
    return steps


class ServerModel:
    """A compiled model bound to a SEAL context; shared by all request threads."""

    def __init__(self, compiled: CompiledModel, backend: SealBackend | None = None) -> None:
        self.compiled = compiled
        self.backend = backend or SealBackend(compiled.params)
        self.steps = schedule(compiled, self.backend)
        self.throughput_steps = schedule(compiled, self.backend, compiled.params.throughput_level)
        self.layout: LatencyLayout = latency_layout(
            compiled.plan, self.backend.slot_count, compiled.latency, compiled.rescale_first
        )
        self._plain_lock = threading.Lock()
        self._latency_plain: list[tuple[Any, Any]] | None = None
        self.galois_elements = frozenset(compiled.galois_elements())
        self.params_digest = compiled.params_digest()  # per request it would cost a JSON dump and a hash
        self.splits = throughput_splits(compiled.plan)
        self.conjugation = 2 * compiled.params.poly_modulus_degree - 1

    @property
    def input_scale(self) -> float:
        return 2.0**self.compiled.params.scale_bits

    @property
    def output_level(self) -> int:
        return self.steps[-1].level_out

    def _prepared(self) -> list[tuple[Any, Any]]:
        """Latency-mode weights (diagonals for bsgs) and biases as plaintexts, encoded once per warm instance."""
        with self._plain_lock:
            if self._latency_plain is None:
                be = self.backend
                prepared = []
                for prog, step in zip(self.layout.layers, self.steps, strict=True):
                    if self.layout.kind in (BSGS, CONV):
                        weights: Any = [
                            [None if d is None else be.encode(d, step.weight_scale, step.level) for d in row]
                            for row in prog.diagonals
                        ]
                    else:
                        weights = be.encode(prog.weights, step.weight_scale, step.level)
                    bias = be.encode(prog.bias, step.scale_in * step.weight_scale, step.level)
                    prepared.append((weights, bias))
                self._latency_plain = prepared
            return self._latency_plain

    def evaluate(self, packing: str, cts: list[Any], keys: EvalKeys) -> list[Any]:
        if self.compiled.needs_relin() and keys.relin is None:
            raise HEError("missing_keys", "this model needs relinearization keys; upload them first")
        if packing == LATENCY:
            if self.galois_elements and (keys.galois is None or not self.galois_elements <= keys.elements):
                raise HEError("missing_keys", "latency packing needs the model's Galois keys")
            if self.layout.kind in (BSGS, CONV):
                return [self._latency_one(ct, keys) for ct in cts]
            return [self._slot_program(ct, keys) for ct in cts]
        if packing == THROUGHPUT:
            if self.splits and (keys.galois is None or self.conjugation not in keys.elements):
                raise HEError("missing_keys", "throughput packing of this model needs the conjugation key")
            return self._throughput(cts, keys)
        raise HEError("bad_request", f"unknown packing {packing!r}")

    def _slot_program(self, x: Any, keys: EvalKeys) -> Any:
        """coeff and rows programs: per layer one product, the bias, one rescale, rotate-and-sum."""
        be = self.backend
        for prog, step, (weights, bias) in zip(self.layout.layers, self.steps, self._prepared(), strict=True):
            acc = be.multiply_plain(x, weights)
            be.add_plain_inplace(acc, bias)
            if prog.sum_steps:
                acc = self._relinearized(acc, keys)
            # rotate before the rescale: key-switching rounding then lands on the product's large
            # scale; `rescale_first` layers (chosen with ~3 more scale bits) rotate one prime lighter
            early = step.rescale and prog.rescale_first
            if early:
                be.rescale_inplace(acc)
            for s in prog.sum_steps:
                be.add_inplace(acc, be.rotate(acc, s, keys.galois))
            if step.rescale and not early:
                be.rescale_inplace(acc)
            if step.square:
                acc = self._square(acc, keys, relinearize=True)
            x = acc
        return self._relinearized(x, keys)

    def _relinearized(self, ct: Any, keys: EvalKeys) -> Any:
        """Relinearize a three-part product only when something needs two parts (lazy)."""
        if self.backend.size(ct) > 2:
            self.backend.relinearize_inplace(ct, keys.relin)
        return ct

    def _latency_one(self, x: Any, keys: EvalKeys) -> Any:
        be = self.backend
        for prog, step, (diags, bias) in zip(self.layout.layers, self.steps, self._prepared(), strict=True):
            needed = {i for row in diags for i, d in enumerate(row) if d is not None}
            babies = {i: (x if i == 0 else be.rotate(x, i, keys.galois)) for i in needed}
            # Giant-step rotations are key switches whose cost grows with the number of primes:
            # when the layer rescales, each partial sum is rescaled first (bias added to the
            # unrotated group 0 before that rescale), so the rotations run one prime lighter.
            early = step.rescale and diags[0] and any(d is not None for d in diags[0])
            acc = None
            for j, row in enumerate(diags):
                inner = None
                for i, plain in enumerate(row):
                    if plain is None:
                        continue
                    term = be.multiply_plain(babies[i], plain)
                    if inner is None:
                        inner = term
                    else:
                        be.add_inplace(inner, term)
                if inner is None:
                    continue
                if early:
                    if j == 0:
                        be.add_plain_inplace(inner, bias)
                    be.rescale_inplace(inner)
                if j:
                    inner = be.rotate(inner, j * prog.baby, keys.galois)
                if acc is None:
                    acc = inner
                else:
                    be.add_inplace(acc, inner)
            if acc is None:
                raise HEError("bad_model", "a layer has only zero weights", 500)
            if not early:
                # the last layer's bias sits in slots [0, m) only, so it survives the
                # rotate-and-sum once; adding it before the rescale lets the sum's rotations
                # run one prime lighter
                be.add_plain_inplace(acc, bias)
                if step.rescale:
                    be.rescale_inplace(acc)
            for s in prog.sum_steps:
                be.add_inplace(acc, be.rotate(acc, s, keys.galois))
            if step.square:
                acc = self._square(acc, keys)
            if prog.replicate_step is not None:
                be.add_inplace(acc, be.rotate(acc, prog.replicate_step, keys.galois))
            x = acc
        return x

    def _square(self, ct: Any, keys: EvalKeys, relinearize: bool = True) -> Any:
        """Square and rescale; without `relinearize` the three-part result is left for later."""
        be = self.backend
        out = be.square(self._relinearized(ct, keys))
        if relinearize:
            be.relinearize_inplace(out, keys.relin)
        be.rescale_inplace(out)
        return out

    def _throughput(self, feats: list[Any], keys: EvalKeys) -> list[Any]:
        """Weighted sums over feature ciphertexts; one complex stream, two real ones after a split."""
        streams = [feats]
        split = False
        for layer, step in zip(self.compiled.plan.layers, self.throughput_steps, strict=True):
            halve = layer.square and not split  # the split below doubles the parts
            outs_per_stream = []
            for cts in streams:
                outs_per_stream.append(
                    [self._weighted_sum(cts, layer, j, step, halve, not split) for j in range(layer.affine.out_dim)]
                )
            if layer.square:
                if not split:
                    # conjugate on the product's large scale, before the rescale: key-switching
                    # noise ~ q0/P * N would be visible at the rescaled scale 2**scale_bits
                    outs_per_stream = self._split(outs_per_stream[0], keys)
                    split = True
                    if step.rescale:
                        for ct in outs_per_stream[0] + outs_per_stream[1]:
                            self.backend.rescale_inplace(ct)
                squared = [[self._square(ct, keys, relinearize=True) for ct in outs] for outs in outs_per_stream]
                if halve:  # this layer split the stream: (c - conj c)^2 = (i y')^2 = -y'^2 (halved weights)
                    for ct in squared[1]:  # later squares act on real values again: no sign to undo
                        self.backend.negate_inplace(ct)
                outs_per_stream = squared
            streams = outs_per_stream
        return [self._relinearized(ct, keys) for outs in streams for ct in outs]

    def _weighted_sum(self, cts: list[Any], layer: Any, j: int, step: Step, halve: bool, complex_bias: bool) -> Any:
        be = self.backend
        w = layer.affine.weight[j] * (0.5 if halve else 1.0)
        bias = float(layer.affine.bias[j]) * (0.5 if halve else 1.0)
        acc = None
        for i in np.flatnonzero(np.abs(w) * step.weight_scale >= 1.0):
            term = be.multiply_plain(cts[i], be.encode(float(w[i]), step.weight_scale, step.level))
            if acc is None:
                acc = term
            else:
                be.add_inplace(acc, term)
        if acc is None:  # a dead unit: x0 / weight_scale stays far below the precision target
            acc = be.multiply_plain(cts[0], be.encode(1.0 / step.weight_scale, step.weight_scale, step.level))
        # the bias goes to both samples of a slot while the stream is complex
        value: complex | float = complex(bias, bias) if complex_bias else bias
        be.add_plain_inplace(acc, be.encode(value, step.scale_in * step.weight_scale, step.level))
        if step.rescale and not halve:  # a split rescales after its conjugation
            be.rescale_inplace(acc)
        return acc

    def _split(self, outs: list[Any], keys: EvalKeys) -> list[list[Any]]:
        """One complex stream -> [2 Re, 2i Im] with one conjugation per ciphertext."""
        be = self.backend
        real, imag = [], []
        for ct in outs:
            ct = self._relinearized(ct, keys)
            conj = be.conjugate(ct, keys.galois)
            imag.append(be.sub(ct, conj))
            be.add_inplace(ct, conj)
            real.append(ct)
        return [real, imag]
