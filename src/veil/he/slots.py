"""Between polynomial coefficients and CKKS slots, in numpy (SEAL's convention).

SEAL's CKKS encoder puts slot j at the root zeta**(3**j mod 2N), zeta = exp(i*pi/N). A slot
vector z and the real polynomial c with c(zeta**(3**j)) = z_j are two views of one plaintext,
and plaintext-ciphertext products multiply polynomials. So a client that encodes the slot
vector of the polynomial sum_i x_i X**i, and a server that multiplies by the slot vector of the
reversed weight polynomial, compute a whole dot product in one coefficient: no rotation, no
Galois key (coefficient packing, as in Cheetah). Both directions are one FFT of length 2N.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def _roots(n: int) -> np.ndarray:
    """Exponents 3**j mod 2N of slot j's root, j < N/2 (the other N/2 roots are conjugates)."""
    two_n = 2 * n
    out = np.empty(n // 2, dtype=np.int64)
    g = 1
    for j in range(n // 2):
        out[j] = g
        g = g * 3 % two_n
    out.setflags(write=False)
    return out


def coeffs_to_slots(coeffs: np.ndarray, n: int) -> np.ndarray:
    """Slot values (N/2 complex) of the real polynomial with these coefficients (degree < N)."""
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if coeffs.size > n:
        raise ValueError(f"{coeffs.size} coefficients do not fit a ring of degree {n}")
    padded = np.zeros(2 * n)
    padded[: coeffs.size] = coeffs
    return (2 * n) * np.fft.ifft(padded)[_roots(n)]


def slots_to_coeffs(slots: np.ndarray, n: int) -> np.ndarray:
    """The N real coefficients of the polynomial whose slot values are `slots` (N/2 complex)."""
    slots = np.asarray(slots, dtype=np.complex128).reshape(-1)
    if slots.size != n // 2:
        raise ValueError(f"expected {n // 2} slot values, got {slots.size}")
    roots = _roots(n)
    spectrum = np.zeros(2 * n, dtype=np.complex128)
    spectrum[roots] = slots
    spectrum[(2 * n - roots) % (2 * n)] = np.conj(slots)
    return np.real(np.fft.fft(spectrum))[:n] / n
