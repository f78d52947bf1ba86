import numpy as np
import pytest

from veil.he.errors import InsecureParametersError
from veil.he.params import HE_STD_128, CKKSParams, check_secure, select_params
from veil.he.plan import Affine, FusedLayer, FusedPlan
from veil.he.seal_backend import SealBackend, make_context


def _plan(widths, squares, rng=np.random.default_rng(0)):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(FusedLayer(Affine(rng.normal(0, 0.3, (b, a)), np.zeros(b)), i < squares))
    plan = FusedPlan(layers, "multiclass")
    plan.calibrate(rng.uniform(-1, 1, (200, widths[0])))
    return plan


@pytest.mark.parametrize(
    ("widths", "squares", "expected_n", "precision"),
    [
        ([30, 1], 0, 4096, 1e-4),  # logistic regression: depth 1, lazy final layer
        ([64, 32, 10], 1, 8192, 1e-4),  # MLP with one square: depth 3
        # three squares of random weights: values reach 4.7e3, so 1e-4 would need 47-bit scales
        ([16, 16, 16, 16, 4], 3, 16384, 1e-3),  # depth 7
    ],
)
def test_selector_picks_expected_ring(widths, squares, expected_n, precision):
    params = select_params(_plan(widths, squares), precision=precision)
    assert params.poly_modulus_degree == expected_n
    assert params.log2_qp <= HE_STD_128[expected_n]
    # and the next smaller ring could not have held it
    smaller = expected_n // 2
    with pytest.raises(InsecureParametersError):
        select_params(_plan(widths, squares), precision=precision, poly_modulus_degree=smaller)
    SealBackend(params)  # SEAL accepts it at tc128


def test_depth_sets_prime_count():
    # every layer rescaled: q0 + affine + square + affine; throughput starts a prime lower and
    # leaves its last layer unrescaled in the large q0 (where the last weights' bits fit beside
    # the scale and the range in one prime: at 1e-3 here)
    p1 = select_params(_plan([64, 32, 10], 1), precision=1e-3, last_layer="throughput-unrescaled")
    assert p1.data_levels == 4
    assert p1.throughput_level == 1 and p1.final_weight_bits is not None
    assert p1.coeff_bits[0] >= p1.scale_bits + p1.final_weight_bits
    # a lazy last layer everywhere (coeff programs): one prime fewer
    assert select_params(_plan([64, 32, 10], 1), precision=1e-3).data_levels == 3
    p2 = select_params(_plan([16, 16, 16, 16, 4], 3), last_layer="rescaled")
    assert p2.data_levels == 8 and p2.final_weight_bits is None


def test_more_precision_costs_bits():
    plan = _plan([64, 32, 10], 1)
    assert select_params(plan, precision=1e-6).scale_bits > select_params(plan, precision=1e-3).scale_bits


@pytest.mark.parametrize(
    ("n", "bits"),
    [(4096, (40, 30, 40)), (1024, (20, 20)), (2048, (30, 30)), (8192, (60, 60, 60, 60)), (3000, (30, 30))],
)
def test_insecure_chains_refused(n, bits):
    with pytest.raises(InsecureParametersError):
        check_secure(n, bits)
    with pytest.raises(InsecureParametersError):
        make_context(CKKSParams(n, bits, 25))


def test_seal_itself_checks_tc128():
    # bypass our table: SEAL's own tc128 check must refuse 110 bits at N=4096
    import tenseal.sealapi as seal

    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(4096)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(4096, [40, 30, 40]))
    assert not seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128).parameters_set()
    assert make_context(CKKSParams(4096, (40, 30, 39), 30)).parameters_set()


def test_pinned_ring_too_small_is_refused_not_downgraded():
    with pytest.raises(InsecureParametersError):
        select_params(_plan([64, 32, 10], 1), poly_modulus_degree=4096)


def test_manifest_records_security(mlp_compiled):
    m = mlp_compiled.manifest()
    assert m["poly_modulus_degree"] == 8192
    assert m["log2_qp"] == sum(m["params"]["coeff_bits"]) <= 218
    assert m["security_level"] == "tc128"


def test_fit_scale_takes_the_largest_scale_a_smaller_ring_holds():
    """Only for measured compiles: the ring the noise model refuses, at the largest scale it
    holds and a special prime no smaller than 17 bits, still 128-bit secure."""
    rng, widths = np.random.default_rng(0), [64, 32, 16, 10]
    layers = [
        FusedLayer(Affine(rng.normal(0, 0.2, (b, a)), np.zeros(b)), i < 2)
        for i, (a, b) in enumerate(zip(widths, widths[1:]))
    ]
    plan = FusedPlan(layers, "multiclass")
    plan.calibrate(rng.uniform(-1, 1, (200, 64)))  # values reach ~140: the model asks for 2^37
    with pytest.raises(InsecureParametersError):
        select_params(plan, 1e-4, 8192, "throughput-unrescaled", product_scale_switching=True)
    fitted = select_params(plan, 1e-4, 8192, "throughput-unrescaled", product_scale_switching=True, fit_scale=True)
    assert fitted.poly_modulus_degree == 8192 and fitted.log2_qp <= HE_STD_128[8192]
    assert fitted.data_levels == 6 and fitted.coeff_bits[-1] >= 17
    bigger = fitted.scale_bits + 1
    assert fitted.coeff_bits[0] + 5 * bigger + 17 > HE_STD_128[8192]  # one more scale bit would not fit
    SealBackend(fitted)
