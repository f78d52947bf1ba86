"""Predictions through Veil (encrypted, attested runtime) equal plain ONNX Runtime's."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_support import assert_matches_reference

ROWS = 40  # single-row requests per model
BATCH = 64  # plus one batched request
MODEL_IDS = ["breast-cancer-lr", "digits-mlp"]


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_predictions_equal_plain_onnxruntime(stack, model_id):
    model = stack.models[model_id]
    assert len(model.x_test) >= ROWS
    correct = 0
    for i in range(ROWS):
        x = model.x_test[i : i + 1]
        out = stack.infer(stack.user, model_id, x)
        assert_matches_reference(model, x, out)
        correct += int(out["label"][0] == model.y_test[i])
    # A sanity check that the model (and not noise) answered: the demo models are accurate.
    assert correct / ROWS > 0.85

    x = np.ascontiguousarray(model.x_test[:BATCH])
    out = stack.infer(stack.user, model_id, x)
    assert out["label"].shape == (BATCH,)
    assert_matches_reference(model, x, out)


def test_every_demo_model_is_covered(models):
    """The parametrisation above names every model train_demo_models makes."""
    assert sorted(models) == sorted(MODEL_IDS)
