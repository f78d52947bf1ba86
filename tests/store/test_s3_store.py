"""The S3-compatible adapter against a real S3-speaking server on loopback (moto's standalone
server: real HTTP, real SigV4-signed boto3 requests, multipart uploads, ranges, ETags), and
`veil store serve --backend s3://...` serving that bucket to the runtime's HTTP reader."""

from __future__ import annotations

import io
import uuid

import pytest

from veil.crypto import chunked
from veil.errors import NotFound, TooLarge, Unavailable
from veil.store import HttpModelReader
from veil.store.client import HttpModelStore, open_store

pytest.importorskip("boto3")
from veil.store.s3 import S3ModelStore  # noqa: E402


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"veil-{uuid.uuid4().hex[:12]}"
    S3ModelStore(name, endpoint_url=s3_env.endpoint_url, create=True)
    return name


def test_a_missing_bucket_is_an_error_never_an_empty_store(s3_env):
    with pytest.raises(Unavailable) as info:
        S3ModelStore("veil-no-such-bucket", endpoint_url=s3_env.endpoint_url)
    assert info.value.code == "no_store" and "does not exist" in info.value.message
    with pytest.raises(Unavailable):
        open_store("s3://veil-no-such-bucket/models")


def test_round_trip_with_multipart_upload_ranges_and_versions(s3_env, bucket, seal):
    store = S3ModelStore(bucket, "deploy-a", endpoint_url=s3_env.endpoint_url, part_size=5 << 20)
    big = seal("m", 1, size=11 << 20)  # three parts: 5 MiB, 5 MiB, the rest
    upload = store.begin_upload("m", 1)
    for i in range(0, len(big.data), 1 << 20):
        upload.write(big.data[i : i + (1 << 20)])
    assert not store.exists("m", 1)  # an incomplete multipart upload is invisible
    assert upload.commit() == len(big.data)
    small = seal("m", 2, size=1000)  # below one part: a single PUT at commit
    store.put("m", 2, io.BytesIO(small.data))

    assert store.versions("m") == [1, 2] and store.versions("n") == []
    assert store.client.list_objects_v2(Bucket=bucket)["KeyCount"] == 2
    keys = sorted(o["Key"] for o in store.client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["deploy-a/models/m/v1.veilm", "deploy-a/models/m/v2.veilm"]  # the local store's layout
    info = store.stat("m", 1)
    assert info.size == len(big.data) and info.etag
    with store.open("m", 1) as f:
        plain = b"".join(chunked.open_stream(big.key, f, model="m", version=1))
    assert plain == big.plaintext
    with store.open("m", 1, offset=len(big.data) - 10) as f:
        assert f.read() == big.data[-10:]
    # another prefix in the same bucket is another store
    assert S3ModelStore(bucket, "deploy-b", endpoint_url=s3_env.endpoint_url).versions("m") == []

    store.delete("m", 1)
    assert store.versions("m") == [2]
    with pytest.raises(NotFound) as err:
        store.open("m", 1)
    assert err.value.code == "unknown_model"


def test_abort_and_size_limit_leave_nothing(s3_env, bucket, seal):
    store = S3ModelStore(bucket, endpoint_url=s3_env.endpoint_url, part_size=5 << 20)
    data = seal("m", 1, size=6 << 20).data
    upload = store.begin_upload("m", 1)
    upload.write(data)  # one part sent
    upload.abort()
    assert store.versions("m") == []
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(TooLarge):
        store.put("m", 1, io.BytesIO(data), max_bytes=1 << 20)
    assert store.versions("m") == []


def test_the_store_service_serves_an_s3_bucket_to_runtimes(s3_env, bucket, seal, start_store_service):
    service = start_store_service(
        "--backend", f"s3://{bucket}/served", "--s3-endpoint-url", s3_env.endpoint_url, env=s3_env.env()
    )
    sealed = seal("m", 3, size=300_000)
    # the gateway writes through the service (staged, then committed) ...
    HttpModelStore(service.url, token=service.token).put("m", 3, io.BytesIO(sealed.data))
    # ... the object is in the bucket ...
    direct = S3ModelStore(bucket, "served", endpoint_url=s3_env.endpoint_url)
    assert direct.versions("m") == [3]
    # ... and a runtime reads it with plain HTTP, range resumes included
    reader = HttpModelReader(service.url)
    assert reader.describe()["backend"] == "S3ModelStore"
    with reader.open("m", 3) as f:
        assert b"".join(chunked.open_stream(sealed.key, f, model="m", version=3)) == sealed.plaintext
    with reader.open("m", 3, offset=299_000) as f:
        assert f.read() == sealed.data[299_000:]
