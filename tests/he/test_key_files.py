"""A user's evaluation keys live in their key file, not in memory: the blob (tens of MiB per
model) is read back for an upload, keeps its key id across processes, and is private."""

from __future__ import annotations

from pathlib import Path

from veil.he import store
from veil.he.client import HEClient
from veil.he.keys import record_key_id, unpack_eval_keys
from veil.he.user import HEKeyChain


def test_eval_keys_file_is_written_once_and_read_back(he_store: Path, tmp_path: Path) -> None:
    spec = store.client_spec(he_store, "lr")
    path = tmp_path / "evalkeys.bin"
    client = HEClient(spec, eval_keys_file=path)
    blob = client.eval_keys()
    assert path.is_file() and path.stat().st_mode & 0o077 == 0
    assert path.read_bytes() == blob
    assert client.eval_keys() == blob  # read back, not made again (fresh keys would differ)
    assert unpack_eval_keys(blob).params_digest == spec["params_digest"]


def test_key_chain_reloads_the_same_keys_and_remakes_them_without_their_secret(he_store: Path, tmp_path: Path) -> None:
    spec = store.client_spec(he_store, "mlp")
    first = HEKeyChain("u1", tmp_path).for_model("mlp", spec)
    again = HEKeyChain("u1", tmp_path).for_model("mlp", spec)
    assert again.key_id == first.key_id
    assert again.key_id == record_key_id("u1", "mlp", again.client.eval_keys())
    (first.directory / "secret.key").unlink()  # keys without their secret are of no use
    fresh = HEKeyChain("u1", tmp_path).for_model("mlp", spec)
    assert fresh.key_id != first.key_id
    assert (fresh.directory / "secret.key").is_file()
    assert fresh.key_id == record_key_id("u1", "mlp", (fresh.directory / "evalkeys.bin").read_bytes())
