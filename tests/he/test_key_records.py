"""An instance streams a user's evaluation-key record from the model store and loads each key
as it reads it. A record the store damaged, cut short, padded or relabelled is refused and
leaves nothing cached; another principal cannot use it; the genuine record then serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from veil.he import store
from veil.he.action import HEAction
from veil.he.errors import HEError
from veil.he.keys import record_header, store_id
from veil.he.user import HEKeyChain, HEModelKeys, decrypt_response, encrypt_request
from veil.store.local import LocalModelStore

USER, OTHER = "ab" * 32, "cd" * 32


@pytest.fixture
def setup(tmp_path: Path, mlp_compiled):  # noqa: ANN001, ANN201
    root = tmp_path / "store"
    store.publish(root, "mlp", mlp_compiled)
    models = LocalModelStore(root, create=True)
    keys = HEKeyChain(USER, tmp_path / "keys").for_model("mlp", store.client_spec(root, "mlp"))
    record = record_header(USER, "mlp") + keys.client.eval_keys()
    return root, models, keys, record


def _put(models: LocalModelStore, kid: str, data: bytes) -> None:
    upload = models.begin_upload(store_id(kid), 1)
    upload.write(data)
    upload.commit()


def _infer(action: HEAction, keys: HEModelKeys, x: np.ndarray, user: str = USER) -> np.ndarray:
    req, batch = encrypt_request("mlp", keys, x, "latency")
    raw = action.run({**req.to_json(), "op": "infer", "model": "mlp", "user": user})
    return decrypt_response(keys, raw, batch.packing, batch.batch)["predictions"]


def _damaged(record: bytes, how: str) -> bytes:
    middle = len(record) // 2
    return {
        "flip-last-byte": record[:-1] + bytes([record[-1] ^ 1]),
        "flip-a-key-byte": record[:middle] + bytes([record[middle] ^ 0x40]) + record[middle + 1 :],
        "truncated": record[: len(record) - 1000],
        "trailing-bytes": record + b"\0" * 16,
        "relabelled-user": record_header(OTHER, "mlp") + record[len(record_header(USER, "mlp")) :],
        "relabelled-model": record_header(USER, "lr") + record[len(record_header(USER, "mlp")) :],
    }[how]


@pytest.mark.parametrize(
    "how",
    ["flip-last-byte", "flip-a-key-byte", "truncated", "trailing-bytes", "relabelled-user", "relabelled-model"],
)
def test_a_damaged_record_is_refused_and_leaves_nothing_cached(setup, mlp_task, how: str) -> None:  # noqa: ANN001
    root, models, keys, record = setup
    _put(models, keys.key_id, _damaged(record, how))
    action = HEAction({"kind": "he", "store": str(root)})
    x = mlp_task.x_test[:3]
    with pytest.raises(HEError) as info:
        _infer(action, keys, x)
    expected = {"key_not_yours"} if how.startswith("relabelled") else {"key_integrity", "bad_keys"}
    assert info.value.code in expected, info.value
    assert len(action.keys) == 0  # nothing half-loaded stays behind
    _put(models, keys.key_id, record)  # the store repaired: the next request fetches again
    assert np.array_equal(_infer(action, keys, x), mlp_task.model.predict(x))
    assert action.keys.fetches == 1 and len(action.keys) == 1


def test_another_principal_cannot_use_the_record(setup, mlp_task) -> None:  # noqa: ANN001
    root, models, keys, record = setup
    _put(models, keys.key_id, record)
    action = HEAction({"kind": "he", "store": str(root)})
    x = mlp_task.x_test[:2]
    with pytest.raises(HEError) as info:
        _infer(action, keys, x, user=OTHER)
    assert info.value.code == "key_not_yours"
    assert np.array_equal(_infer(action, keys, x), mlp_task.model.predict(x))
    with pytest.raises(HEError) as info:  # cached now: still the owner's alone
        _infer(action, keys, x, user=OTHER)
    assert info.value.code == "key_not_yours"


def test_a_valid_record_of_other_keys_under_this_key_id_is_refused_by_its_hash(setup, mlp_task, tmp_path: Path) -> None:  # noqa: ANN001
    """The store swaps in another key set of the same user and model: every key parses and the
    header is right, so only the record's hash against the key id can catch it."""
    root, models, keys, record = setup
    other = HEKeyChain(USER, tmp_path / "other-keys").for_model("mlp", store.client_spec(root, "mlp"))
    assert other.key_id != keys.key_id
    swapped = record_header(USER, "mlp") + other.client.eval_keys()
    _put(models, keys.key_id, swapped)
    action = HEAction({"kind": "he", "store": str(root)})
    x = mlp_task.x_test[:2]
    with pytest.raises(HEError) as info:
        _infer(action, keys, x)
    assert info.value.code == "key_integrity", info.value
    assert len(action.keys) == 0
    # the same bytes under their own id are a good record: it was the hash that refused them
    _put(models, other.key_id, swapped)
    assert np.array_equal(_infer(action, other, x), mlp_task.model.predict(x))
