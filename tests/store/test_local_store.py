"""The local-directory store: the interface every other store follows (versions, atomic staged
uploads, size limits, offsets, tags that change with the file) and a missing root that is an error."""

from __future__ import annotations

import io

import pytest

from veil.errors import NotFound, TooLarge, Unavailable
from veil.store import LocalModelStore, ModelStore, open_reader


def test_missing_root_is_an_error_unless_created(tmp_path):
    with pytest.raises(Unavailable) as info:
        LocalModelStore(tmp_path / "absent")
    assert info.value.code == "no_store" and str(tmp_path / "absent") in info.value.message
    assert not (tmp_path / "absent").exists()
    LocalModelStore(tmp_path / "made", create=True)
    assert (tmp_path / "made" / "models").is_dir()
    assert isinstance(open_reader(str(tmp_path / "made")), LocalModelStore)


def test_versions_put_open_offset_delete(tmp_path, seal):
    store: ModelStore = LocalModelStore(tmp_path, create=True)
    a, b = seal("m", 1), seal("m", 2)
    assert store.put("m", 1, io.BytesIO(a.data)) == len(a.data)
    store.put("m", 2, io.BytesIO(b.data))
    assert store.versions("m") == [1, 2] and store.versions("x") == []
    with store.open("m", 2, offset=10) as f:
        assert f.read() == b.data[10:]
    store.delete("m", 1)
    assert store.versions("m") == [2] and not store.exists("m", 1)
    with pytest.raises(NotFound) as info:
        store.open("m", 1)
    assert info.value.code == "unknown_model"
    with pytest.raises(NotFound):
        store.stat("m", 1)


def test_the_tag_changes_when_the_file_is_replaced(tmp_path, seal):
    store = LocalModelStore(tmp_path, create=True)
    store.put("m", 1, io.BytesIO(seal("m", 1).data))
    before = store.stat("m", 1)
    store.put("m", 1, io.BytesIO(seal("m", 1).data))
    after = store.stat("m", 1)
    assert before.etag != after.etag and before.size == after.size


def test_over_the_limit_nothing_is_kept(tmp_path, seal):
    store = LocalModelStore(tmp_path, create=True)
    big = seal("m", 1, size=100_000)
    with pytest.raises(TooLarge):
        store.put("m", 1, io.BytesIO(big.data), max_bytes=1000)
    assert store.versions("m") == [] and list((tmp_path / "models").rglob(".upload-*")) == []


def test_an_unfinished_upload_is_invisible_and_swept(tmp_path, seal):
    store = LocalModelStore(tmp_path, create=True)
    upload = store.begin_upload("m", 1)
    upload.write(seal("m", 1).data)
    assert not store.exists("m", 1)
    assert store.sweep_uploads(older_than_s=3600) == 0  # a fresh one is someone's upload in progress
    assert store.sweep_uploads(older_than_s=-1) == 1  # one left by a crashed writer goes
    assert not store.exists("m", 1)
    upload.abort()


@pytest.mark.parametrize("version", [0, -1, 10**15, "1", 1.0, True])
def test_versions_must_be_positive_integers(tmp_path, version):
    store = LocalModelStore(tmp_path, create=True)
    with pytest.raises(ValueError, match="version must be a positive integer"):
        store.path("m", version)


def test_model_ids_are_checked(tmp_path):
    store = LocalModelStore(tmp_path, create=True)
    with pytest.raises(Exception, match="model"):
        store.path("../escape", 1)
