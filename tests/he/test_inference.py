"""Encrypted predictions (real SEAL ciphertexts, end to end through HEAction) vs plaintext."""

import numpy as np
import pytest


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


def test_single_sample_and_partial_blocks(mlp_remote, mlp_task, mlp_compiled):
    # 33 samples: one full latency ciphertext (32 blocks) plus one with a single block
    x = mlp_task.x_test[:33]
    result = mlp_remote.infer(x, packing="latency")
    np.testing.assert_allclose(result.scores, mlp_compiled.predict_plain(x), atol=1e-3)


def test_only_needed_rotation_keys_are_made(mlp_compiled):
    steps = mlp_compiled.rotation_steps()
    n2 = 2 * mlp_compiled.params.poly_modulus_degree
    assert mlp_compiled.galois_elements() == sorted({pow(3, s, n2) for s in steps})
    assert len(steps) < 20  # not all powers of two and not every step up to 64
    assert 4096 - 64 in steps  # the replication rotation (right by n = 64)


def test_uploads_are_seeded(mlp_client, mlp_task):
    batch = mlp_client.encrypt(mlp_task.x_test[:1], "latency")
    be = mlp_client.backend
    full = be.ciphertext_bound(0) - 4096  # both polynomials, uncompressed
    assert len(batch.ciphertexts[0]) < 0.6 * full
