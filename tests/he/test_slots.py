"""The coefficient <-> slot maps behind coefficient packing, checked in numpy and on SEAL."""

import numpy as np
import pytest

from veil.he.params import CKKSParams
from veil.he.seal_backend import SealBackend, SealSecretKey
from veil.he.slots import coeffs_to_slots, slots_to_coeffs


def _negacyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = len(a)
    full = np.convolve(a, b)
    out = full[:n].copy()
    out[: len(full) - n] -= full[n:]
    return out


@pytest.mark.parametrize("n", [16, 4096])
def test_round_trip_and_products(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n)
    np.testing.assert_allclose(slots_to_coeffs(coeffs_to_slots(a, n), n), a, atol=1e-9)
    # slot-wise products are negacyclic polynomial products (the ring Z[X]/(X^N + 1))
    prod = slots_to_coeffs(coeffs_to_slots(a, n) * coeffs_to_slots(b, n), n)
    np.testing.assert_allclose(prod, _negacyclic(a, b), atol=1e-8)


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError):
        coeffs_to_slots(np.ones(9), 8)
    with pytest.raises(ValueError):
        slots_to_coeffs(np.ones(3), 8)


def test_seal_uses_the_same_slot_order():
    """A dot product in one coefficient of a real SEAL plaintext-ciphertext product."""
    be = SealBackend(CKKSParams(4096, (55, 54), 27, 20))
    key = SealSecretKey(be)
    rng = np.random.default_rng(7)
    x, w = rng.normal(size=30), rng.normal(size=30)
    cx, cw = np.zeros(4096), np.zeros(4096)
    cx[:30] = x
    cw[29 - np.arange(30)] = w  # reversed: coefficient 29 of the product is x . w
    ct = be.load_ciphertext(key.encrypt(coeffs_to_slots(cx, 4096), 2.0**27), 0, 2.0**27)
    out = be.multiply_plain(ct, be.encode(coeffs_to_slots(cw, 4096), 2.0**20, 0))
    coeffs = slots_to_coeffs(key.decrypt(be.serialize(out), complex_slots=True), 4096)
    assert abs(coeffs[29] - x @ w) < 1e-4
