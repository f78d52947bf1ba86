"""Model cards, end to end: the owner signs one at publish; a user fetches it through the
gateway, checks the owner's signature (key and current version from the KeyService's signed
channel), and uses it to name, shape and type inputs and to explain a mismatch before sending."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from e2e_support import CLIENT_TIMEOUT_S

from veil.errors import VeilError
from veil.sdk import ModelOwner
from veil.wire.cards import ModelCard, sign_card


@pytest.fixture(scope="module")
def skl_model():
    """A scikit-learn model converted the usual way: its input is called `float_input`."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    types = [("float_input", FloatTensorType([None, 4]))]
    onnx = convert_sklearn(model, initial_types=types, options={"zipmap": False}).SerializeToString()
    return onnx, x


@pytest.fixture
def published(stack, skl_model):
    onnx, x = skl_model
    owner = ModelOwner(stack.info, stack.owner.identity, trust=stack.trust, timeout=CLIENT_TIMEOUT_S)
    result = owner.publish("iris-card", onnx, description="iris LR, 4 features")
    owner.grant("iris-card", stack.user.id)
    stack.user.request_access("iris-card")
    yield result, onnx, x
    owner.close()


def test_card_is_verified_and_names_the_input(stack, published):
    result, onnx, x = published
    card = stack.user.card("iris-card", refresh=True)
    assert (card.model, card.version, card.mode, card.owner) == ("iris-card", result["version"], "tee", stack.owner.id)
    assert [(t.name, t.dtype, t.shape) for t in card.inputs] == [("float_input", "float32", (None, 4))]
    assert card.description == "iris LR, 4 features"
    out = stack.user.infer("iris-card", x[:3])  # a bare array: named `float_input` from the card
    import onnxruntime as ort

    ref = ort.InferenceSession(onnx).run(None, {"float_input": x[:3]})
    np.testing.assert_array_equal(out["label"], ref[0])


def test_mismatch_is_explained_before_sending(stack, published):
    _, _, x = published
    cases = [
        ({"float_input": x[:2].astype(np.float64)}, "float_input: expected float32 [batch, 4], got float64 [2, 4]"),
        ({"float_input": x[:2, :3]}, "float_input: expected float32 [batch, 4], got float32 [2, 3]"),
        ({"input": x[:2]}, "input: the model has no such input"),
    ]
    for inputs, words in cases:
        with pytest.raises(VeilError) as info:
            stack.user.infer("iris-card", inputs)
        assert info.value.code == "card_mismatch" and words in info.value.message, info.value.message


def _db(stack) -> sqlite3.Connection:
    return sqlite3.connect(stack.deployment.keyservice_dir / "keyservice.db", isolation_level=None)


def test_forged_or_stale_card_is_refused(stack, published, skl_model):
    result, onnx, _ = published
    version = result["version"]
    with _db(stack) as db:
        (text,) = db.execute(
            "SELECT card FROM model_versions WHERE model_id='iris-card' AND version=?", (version,)
        ).fetchone()
    signed = json.loads(text)
    # the cloud rewrites the card (another input name) and cannot re-sign it as the owner
    forged = {**signed, "card": {**signed["card"], "description": "changed by the operator"}}
    with _db(stack) as db:
        db.execute(
            "UPDATE model_versions SET card=? WHERE model_id='iris-card' AND version=?", (json.dumps(forged), version)
        )
    with pytest.raises(VeilError) as info:
        stack.user.card("iris-card", refresh=True)
    assert info.value.code == "bad_card" and "signature" in info.value.message
    # a genuine card of an older version, served for the current one
    old = ModelCard.from_json({**signed["card"], "version": version - 1 if version > 1 else version + 1})
    with _db(stack) as db:
        db.execute(
            "UPDATE model_versions SET card=? WHERE model_id='iris-card' AND version=?",
            (json.dumps(sign_card(stack.owner.identity, old)), version),
        )
    with pytest.raises(VeilError) as info:
        stack.user.card("iris-card", refresh=True)
    assert info.value.code == "bad_card" and "current version" in info.value.message
    with _db(stack) as db:  # put the real one back for the other tests
        db.execute("UPDATE model_versions SET card=? WHERE model_id='iris-card' AND version=?", (text, version))
    assert stack.user.card("iris-card", refresh=True).version == version


def test_only_the_owner_attaches_a_card_and_only_while_staged(stack, published):
    result, _, _ = published
    intruder = stack.new_owner()
    card = ModelCard("iris-card", result["version"], "tee", intruder.id, (), ())
    with pytest.raises(VeilError) as info:
        intruder.keyservice.put_card("iris-card", result["version"], sign_card(intruder.identity, card))
    assert info.value.code == "not_owner"
    mine = ModelCard("iris-card", result["version"], "tee", stack.owner.id, (), ())
    with pytest.raises(VeilError) as info:  # the version is current now: its card is fixed
        stack.owner.keyservice.put_card("iris-card", result["version"], sign_card(stack.owner.identity, mine))
    assert info.value.code == "not_staged"
