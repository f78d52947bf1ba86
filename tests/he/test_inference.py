"""Encrypted predictions (real SEAL ciphertexts, end to end through HEAction) vs plaintext."""

import numpy as np
import pytest

from veil.he import store
from veil.he.action import HEAction
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.errors import HEError, PlanError


@pytest.mark.parametrize("packing", ["latency", "throughput"])
def test_lr_breast_cancer_encrypted_matches_plaintext(lr_remote, lr_task, lr_compiled, packing):
    x = lr_task.x_test
    result = lr_remote.infer(x, packing=packing)
    assert result.packing == packing
    plain_scores = lr_compiled.predict_plain(x)
    assert np.max(np.abs(result.scores - plain_scores)) <= 1e-3
    assert np.mean(result.predictions == lr_task.model.predict(x)) >= 0.999


@pytest.mark.parametrize("packing", ["latency", "throughput"])
def test_mlp_digits_encrypted_matches_plaintext(mlp_remote, mlp_task, mlp_compiled, packing):
    x = mlp_task.x_test
    result = mlp_remote.infer(x, packing=packing)
    plain_scores = mlp_compiled.predict_plain(x)
    assert result.scores.shape == (len(x), 10)
    assert np.max(np.abs(result.scores - plain_scores)) <= 1e-3
    assert np.mean(result.predictions == mlp_task.model.predict(x)) >= 0.999
    assert np.mean(result.predictions == mlp_task.y_test) > 0.9


def test_packings_give_the_same_answers(mlp_remote, mlp_task):
    x = mlp_task.x_test[:40]
    lat = mlp_remote.infer(x, packing="latency")
    thr = mlp_remote.infer(x, packing="throughput")
    np.testing.assert_allclose(lat.scores, thr.scores, atol=2e-3)
    assert list(lat.predictions) == list(thr.predictions)


def test_cost_model_picks_latency_for_one_and_throughput_for_many(mlp_client, lr_client):
    assert mlp_client.choose_packing(1) == "latency"
    assert mlp_client.choose_packing(4096) == "throughput"
    assert lr_client.choose_packing(1) == "latency"


def test_latency_batches_span_several_ciphertexts(lr_remote, lr_task, lr_compiled, mlp_remote, mlp_task, mlp_compiled):
    # coeff packs 68 breast-cancer samples per ciphertext: 70 needs two, the second nearly empty
    x = lr_task.x_test[:70]
    assert lr_compiled.latency_layout().samples_per_ciphertext < 70
    np.testing.assert_allclose(lr_remote.infer(x, packing="latency").scores, lr_compiled.predict_plain(x), atol=1e-3)
    # rows holds one digits sample per ciphertext: 3 samples are 3 ciphertexts
    x = mlp_task.x_test[:3]
    np.testing.assert_allclose(mlp_remote.infer(x, packing="latency").scores, mlp_compiled.predict_plain(x), atol=1e-3)


def test_rows_with_several_samples_per_ciphertext(tmp_path, mlp_task):
    """A larger ring packs two digits samples per ciphertext; the cross-block sums stay per sample."""
    compiled = compile_model(mlp_task.model, mlp_task.x_train, name="mlp16k", poly_modulus_degree=16384)
    assert compiled.latency == "rows" and compiled.latency_layout().samples_per_ciphertext == 2
    store.publish(tmp_path, "mlp16k", compiled)
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    remote = RemoteModel(HEClient(store.client_spec(tmp_path, "mlp16k")), ActionTransport(action), "mlp16k")
    x = mlp_task.x_test[:3]  # one full ciphertext and one half-empty
    np.testing.assert_allclose(remote.infer(x, packing="latency").scores, compiled.predict_plain(x), atol=1e-3)


def test_throughput_fills_both_halves_of_the_slots(lr_remote, lr_task, lr_compiled):
    # 2 * 2048 slots hold 4096 samples per group: 4099 needs a second group with 3 samples
    slots = lr_compiled.params.slots
    x = np.resize(lr_task.x_test, (2 * slots + 3, lr_task.x_test.shape[1]))
    result = lr_remote.infer(x, packing="throughput")
    assert result.scores.shape == (len(x), 1)
    np.testing.assert_allclose(result.scores, lr_compiled.predict_plain(x), atol=1e-3)


def test_programs_are_chosen_by_shape(lr_compiled, mlp_compiled):
    assert lr_compiled.latency == "coeff"  # one affine layer: a polynomial product
    assert lr_compiled.galois_elements() == []  # no rotation, no conjugation: no Galois key
    assert not lr_compiled.needs_relin()
    # nothing to key-switch: a single prime without a special prime, in the smallest ring
    assert not lr_compiled.params.key_switching and len(lr_compiled.params.coeff_bits) == 1
    assert lr_compiled.params.poly_modulus_degree == 2048
    assert mlp_compiled.latency == "rows"
    # throughput runs one prime lighter only where the last weights' bits fit beside the range
    assert mlp_compiled.params.throughput_level in (0, 1)
    assert min(mlp_compiled.meta["headroom_bits"].values()) >= 0


def test_only_needed_rotation_keys_are_made(mlp_compiled):
    steps = mlp_compiled.rotation_steps()
    # rows: log2(64) in-block sums of layer 1, log2(32) across the 128-slot blocks for layer 2
    assert steps == sorted([1, 2, 4, 8, 16, 32, 128, 256, 512, 1024, 2048])
    n2 = 2 * mlp_compiled.params.poly_modulus_degree
    expected = {pow(3, s, n2) for s in steps} | {n2 - 1}  # and the throughput split's conjugation
    assert mlp_compiled.galois_elements() == sorted(expected)


def test_bsgs_program_still_serves_and_agrees(tmp_path, mlp_task, mlp_compiled):
    """The general diagonal program (models too wide for rows) on the same MLP."""
    compiled = compile_model(mlp_task.model, mlp_task.x_train, name="mlp-bsgs", latency="bsgs")
    assert compiled.latency == "bsgs"
    assert compiled.params.final_weight_bits is None  # baby steps rotate inputs: no large q0
    steps = compiled.rotation_steps()
    assert 4096 - 64 in steps  # the replication rotation (right by n = 64)
    assert len(steps) < 20  # not all powers of two and not every step up to 64
    store.publish(tmp_path, "mlp-bsgs", compiled)
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    remote = RemoteModel(HEClient(store.client_spec(tmp_path, "mlp-bsgs")), ActionTransport(action), "mlp-bsgs")
    x = mlp_task.x_test[:33]  # one full ciphertext of 32 blocks plus one with a single block
    result = remote.infer(x, packing="latency")
    np.testing.assert_allclose(result.scores, compiled.predict_plain(x), atol=1e-3)
    np.testing.assert_allclose(result.scores, mlp_compiled.predict_plain(x), atol=2e-3)


def test_a_rows_model_refuses_a_program_it_does_not_fit(lr_task):
    with pytest.raises(PlanError, match="rows"):
        compile_model(lr_task.model, lr_task.x_train, latency="rows")


def test_throughput_without_the_conjugation_key_is_refused(tmp_path, mlp_compiled, mlp_task):
    store.publish(tmp_path, "m", mlp_compiled)
    action = HEAction({"kind": "he", "store": str(tmp_path)})
    client = HEClient(store.client_spec(tmp_path, "m"))
    conj = 2 * mlp_compiled.params.poly_modulus_degree - 1
    client.spec = {**client.spec, "galois_elements": [e for e in client.spec["galois_elements"] if e != conj]}
    remote = RemoteModel(client, ActionTransport(action), "m")
    remote.upload_keys()
    with pytest.raises(HEError) as err:
        remote.infer(mlp_task.x_test[:5], packing="throughput")
    assert err.value.code == "missing_keys"


def test_uploads_are_seeded(mlp_client, mlp_task):
    batch = mlp_client.encrypt(mlp_task.x_test[:1], "latency")
    be = mlp_client.backend
    full = be.ciphertext_bound(0) - 4096  # both polynomials, uncompressed
    assert len(batch.ciphertexts[0]) < 0.6 * full
