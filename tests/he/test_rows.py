"""The rows latency program at two and three layers and its rescale-first variant.

Real SEAL ciphertexts through `HEAction`, at every batch size the model advertises.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from veil.he import store
from veil.he.action import HEAction
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.compiled import CompiledModel
from veil.he.packing import ROWS

PRECISION = 1e-4


@pytest.fixture(scope="module")
def mlp3_task():
    from veil.he.tasks import digits_mlp3

    return digits_mlp3()


def _serve(tmp_path, compiled, name: str) -> RemoteModel:
    store.publish(tmp_path, name, compiled)
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    remote = RemoteModel(HEClient(store.client_spec(tmp_path, name)), ActionTransport(action), name)
    remote.upload_keys()
    return remote


def _every_batch(remote: RemoteModel, compiled: CompiledModel, x: np.ndarray) -> None:
    """Latency at 1, a full ciphertext and one more; throughput at 3."""
    per = compiled.latency_layout().samples_per_ciphertext
    for packing, batch in (("latency", 1), ("latency", per), ("latency", per + 1), ("throughput", 3)):
        xs = np.resize(x, (batch, x.shape[1]))
        res = remote.infer(xs, packing=packing)
        ref = compiled.predict_plain(xs)
        assert res.scores.shape == ref.shape, (packing, batch)
        assert float(np.max(np.abs(res.scores - ref))) <= PRECISION, (packing, batch)
        assert np.array_equal(res.predictions, remote.client.predict(ref)), (packing, batch)


def test_three_layer_rows_program_serves_at_every_batch_size(tmp_path, mlp3_task):
    """64-32-16-10: one sample fills the ciphertext, layer 3 reads z from every block (cyclic
    sum) and leaves output p in slot 0 of block p; layer 3 reuses layer 1's Galois keys."""
    compiled = compile_model(mlp3_task.model, mlp3_task.x_train, name="m3")
    layout = compiled.latency_layout()
    assert compiled.latency == ROWS and len(layout.layers) == 3
    assert layout.samples_per_ciphertext == 1 and layout.out_stride == layout.block
    assert set(layout.layers[2].sum_steps) <= set(layout.layers[0].sum_steps)
    # in-block (log2 64), cross-block (log2 blocks) and the conjugation: nothing for layer 3
    assert len(compiled.galois_elements()) == 6 + int(np.log2(layout.blocks)) + 1
    assert HEClient(compiled.client_spec()).layout.out_stride == layout.block  # the client reads it
    _every_batch(_serve(tmp_path, compiled, "m3"), compiled, mlp3_task.x_test)


def test_rescale_first_is_recorded_and_honoured(tmp_path, mlp_task):
    """The two-layer MLP rescales before its sums (3 more scale bits); the flag survives
    save/load and a copy without it (rotating first) gives the same answers."""
    compiled = compile_model(mlp_task.model, mlp_task.x_train, name="rf")
    assert compiled.latency == ROWS and compiled.rescale_first
    assert all(layer.rescale_first for layer in compiled.latency_layout().layers)
    loaded = CompiledModel.load(compiled.save(tmp_path / "saved"))
    assert loaded.rescale_first
    plain = copy.deepcopy(compiled)
    plain.rescale_first = False
    x = mlp_task.x_test[:3]
    for model, name in ((compiled, "rf-on"), (plain, "rf-off")):
        res = _serve(tmp_path / name, model, name).infer(x, packing="latency")
        np.testing.assert_allclose(res.scores, model.predict_plain(x), atol=PRECISION)


def test_three_layer_rows_needs_room_for_its_outputs():
    """Layer 3 keeps a block per output: a plan with more outputs than blocks is not rows."""
    from veil.he.packing import latency_layout
    from veil.he.plan import Affine, FusedLayer, FusedPlan

    rng = np.random.default_rng(0)
    widths = [8, 4, 4, 40]  # 40 outputs, 2048 slots / 16-slot blocks = 128 blocks: fits
    layers = [
        FusedLayer(Affine(rng.normal(0, 0.3, (b, a)), np.zeros(b)), i < 2)
        for i, (a, b) in enumerate(zip(widths, widths[1:]))
    ]
    plan = FusedPlan(layers, "multiclass")
    assert latency_layout(plan, 2048).kind == ROWS
    layers[-1] = FusedLayer(Affine(rng.normal(0, 0.3, (200, 4)), np.zeros(200)), False)
    assert latency_layout(FusedPlan(layers, "multiclass"), 2048).kind != ROWS


def test_two_layer_rows_serves_at_every_batch_size(tmp_path, mlp_task):
    """The digits MLP as compiled by default (measured), at every batch size it advertises."""
    compiled = compile_model(mlp_task.model, mlp_task.x_train, name="m2", verify_samples=8)
    assert max(compiled.meta["measured_error"].values()) <= 0.7 * PRECISION
    _every_batch(_serve(tmp_path, compiled, "m2"), compiled, mlp_task.x_test)


def test_hidden_gains_change_nothing_in_plaintext(mlp3_task):
    """Powers of two on hidden outputs, divided back out in the next weights: bit-for-bit the
    same scores, larger hidden values (what dilutes a ciphertext's rescale noise)."""
    from veil.he.compile import with_hidden_gains
    from veil.he.compiler import from_sklearn
    from veil.he.errors import PlanError
    from veil.he.fusion import fuse

    fused = fuse(from_sklearn(mlp3_task.model))
    x = mlp3_task.x_test[:50]
    gained = with_hidden_gains(fused, (4, 2))
    assert np.array_equal(gained.evaluate(x), fused.evaluate(x))
    h0 = x @ fused.layers[0].affine.weight.T + fused.layers[0].affine.bias
    h1 = x @ gained.layers[0].affine.weight.T + gained.layers[0].affine.bias
    assert np.array_equal(h1, 4 * h0)
    assert np.array_equal(gained.layers[-1].affine.bias, fused.layers[-1].affine.bias)
    with pytest.raises(PlanError, match="power of two"):
        with_hidden_gains(fused, (3,))


@pytest.mark.slow
def test_measured_compile_fits_the_deep_mlp_into_n8192(tmp_path, mlp3_task):
    """64-32-16-10 (depth 5): the noise model wants N=16384; measured, the compiler takes the
    largest scale N=8192 holds (a small special prime: rows rotates only products) and a hidden
    gain, keeps it only within 0.7x the target, and it serves at every batch size."""
    compiled = compile_model(mlp3_task.model, mlp3_task.x_train, name="m3f", verify_samples=16)
    p = compiled.params
    assert p.poly_modulus_degree == 8192 and compiled.latency == ROWS and not compiled.rescale_first
    assert compiled.meta["fitted_scale"] and p.log2_qp <= 218
    assert max(compiled.meta["measured_error"].values()) <= 0.7 * PRECISION
    assert min(compiled.meta["headroom_bits"].values()) >= 0
    assert len(HEClient(compiled.client_spec()).eval_keys()) <= 32 * 2**20
    _every_batch(_serve(tmp_path, compiled, "m3f"), compiled, mlp3_task.x_test)
    assert compile_model(mlp3_task.model, mlp3_task.x_train).params.poly_modulus_degree == 16384  # unmeasured
